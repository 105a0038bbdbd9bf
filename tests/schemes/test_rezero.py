"""ReZero: identity at init, a zero-initialised gate per layer that receives a gradient."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models.lm import DecoderLM
from deepscale_jax.schemes import build_scheme
from tests.helpers import init_params, tokens
from tests.schemes.stds import DEPTH_CASES, check_scheme_stds, fans, glorot, lm_config, lm_params

TINY = ModelConfig(
    vocab_size=64, num_layers=3, d_model=32, num_heads=4, d_ff=64, max_len=16, norm="none"
)


def _model(**overrides) -> DecoderLM:
    cfg = dataclasses.replace(TINY, **overrides)
    return DecoderLM(cfg, build_scheme({"name": "rezero"}, cfg))


@pytest.mark.parametrize("scan", [True, False])
def test_every_layer_is_the_identity_at_init(scan):
    model = _model(scan_layers=scan)
    toks = tokens()
    params = init_params(model, toks)
    _, state = jax.jit(lambda p: model.apply({"params": p}, toks, mutable=["intermediates"]))(
        params
    )
    inter = state["intermediates"]
    (embed_out,) = inter["embed_out"]
    decoder = inter["decoder"]
    outputs = (
        decoder["layers"]["residual"][0]
        if scan
        else [decoder[f"layer_{i:03d}"]["residual"][0] for i in range(3)]
    )
    for out in outputs:
        np.testing.assert_array_equal(out, embed_out)


def test_gate_is_one_zero_scalar_per_layer_and_gets_a_gradient():
    model = _model()
    toks = tokens()
    params = init_params(model, toks)
    gate = params["decoder"]["layers"]["resweight"]
    assert gate.shape == (3,)
    np.testing.assert_array_equal(gate, 0.0)

    def loss(p):
        logits = model.apply({"params": p}, toks)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = jax.jit(jax.grad(loss))(params)["decoder"]["layers"]
    assert np.all(np.abs(grads["resweight"]) > 1e-6)
    # With the gate at 0 the branch weights get no gradient yet.
    np.testing.assert_array_equal(grads["ffn"]["ffn_in"]["kernel"], 0.0)


def test_needs_norm_none():
    with pytest.raises(
        ValueError, match=r"scheme 'rezero' needs model.norm in \(none\); got model.norm='layer_n"
    ):
        build_scheme({"name": "rezero"}, ModelConfig())


def test_unrolled_gates_are_scalars():
    params = lm_params("rezero", lm_config(4, False, norm="none"))
    assert params["decoder"]["layer_002"]["resweight"].shape == ()


def expected_std(role, layer, cfg):
    if role in ("embed", "pos_embed", "head"):
        return cfg.d_model**-0.5
    return glorot(*fans(role, cfg))


@pytest.mark.parametrize(("depth", "unrolled"), DEPTH_CASES)
def test_measured_stds(depth, unrolled):
    check_scheme_stds("rezero", expected_std, depth, unrolled, norm="none")
