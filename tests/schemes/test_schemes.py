"""Every weight's init comes from the scheme: measured stds match each scheme's formula."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models.lm import DecoderLM
from deepscale_jax.schemes import LAYER_ROLES, ROLES, SCHEMES, build_scheme
from tests.helpers import init_params, tokens

CFG = ModelConfig(
    vocab_size=256,
    num_layers=4,
    d_model=128,
    num_heads=4,
    d_ff=512,
    max_len=64,
    tie_embeddings=False,
)


def expected_std(scheme: str, role: str, cfg: ModelConfig) -> float:
    d, d_head, n = cfg.d_model, cfg.head_dim, cfg.num_layers
    if scheme == "xavier":
        return {
            "q": math.sqrt(2 / (d + d_head)),
            "k": math.sqrt(2 / (d + d_head)),
            "v": math.sqrt(2 / (d + d_head)),
            "ffn_in": math.sqrt(2 / (5 * d)),
            "ffn_out": math.sqrt(2 / (5 * d)),
        }.get(role, math.sqrt(1 / d))
    return 0.02 / math.sqrt(2 * n) if role in ("attn_out", "ffn_out") else 0.02


# Roles the decoder LM does not create (cross-attention, patches: later architectures).
LM_ROLES = set(ROLES) - {"cross_q", "cross_k", "cross_v", "cross_out", "patch_embed"}


def weights_by_role(params: dict) -> dict[str, np.ndarray]:
    layers = params["decoder"]["layers"]
    return {
        "embed": params["embed"]["embedding"],
        "pos_embed": params["pos_embed"]["embedding"],
        "head": params["head"]["kernel"],
        "q": layers["attn"]["q"]["kernel"],
        "k": layers["attn"]["k"]["kernel"],
        "v": layers["attn"]["v"]["kernel"],
        "attn_out": layers["attn"]["attn_out"]["kernel"],
        "ffn_in": layers["ffn"]["ffn_in"]["kernel"],
        "ffn_out": layers["ffn"]["ffn_out"]["kernel"],
    }


@pytest.mark.parametrize("scheme", ["xavier", "default"])
def test_each_weight_std_matches_its_formula(scheme):
    model = DecoderLM(CFG, build_scheme({"name": scheme}, CFG))
    params = init_params(model, tokens(length=64, vocab=256))
    weights = weights_by_role(params)
    assert set(weights) == LM_ROLES
    for role, w in weights.items():
        w = np.asarray(w)
        per_layer = (
            w.reshape(CFG.num_layers, -1)
            if role in ("q", "k", "v", "attn_out", "ffn_in", "ffn_out")
            else [w]
        )
        for layer_w in per_layer:
            assert np.std(layer_w) == pytest.approx(expected_std(scheme, role, CFG), rel=0.05), role
            assert abs(np.mean(layer_w)) < 0.05 * expected_std(scheme, role, CFG) + 1e-3


def test_biases_zero_and_norm_gains_one():
    model = DecoderLM(CFG, build_scheme({"name": "xavier"}, CFG))
    params = init_params(model, tokens(length=64, vocab=256))
    layers = params["decoder"]["layers"]
    np.testing.assert_array_equal(layers["attn"]["q"]["bias"], 0)
    np.testing.assert_array_equal(layers["attn_norm"]["scale"], 1)
    np.testing.assert_array_equal(layers["ffn_norm"]["bias"], 0)


def test_default_scheme_std_base_option_and_residual():
    cfg = dataclasses.replace(CFG, num_layers=8)
    scheme = build_scheme({"name": "default", "std_base": 0.01}, cfg)
    assert scheme.std("q", 0) == 0.01
    assert scheme.std("ffn_out", 3) == pytest.approx(0.01 / 4)
    assert scheme.residual(5) == (1.0, 1.0)


def test_unknown_role_is_named():
    scheme = build_scheme({"name": "xavier"}, CFG)
    with pytest.raises(ValueError, match="no init for role 'bogus'; known roles: embed"):
        scheme.init("bogus", 0)


def test_schemes_are_hashable_values():
    a = build_scheme({"name": "xavier"}, CFG)
    b = build_scheme({"name": "xavier"}, CFG)
    assert a == b and hash(a) == hash(b)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_scheme_has_a_rule_for_every_role(name):
    """Including the roles of later architectures (cross-attention, patches), in both stacks."""
    norm = "none" if name in ("t_fixup", "rezero") else "layer_norm"
    placement = "post" if name == "deepnorm" else "pre"
    cfg = dataclasses.replace(
        CFG, architecture="encoder_decoder", encoder_layers=2, norm=norm, norm_placement=placement
    )
    key = jax.random.PRNGKey(0)
    for stack in ("encoder", "decoder"):
        scheme = build_scheme({"name": name}, cfg).for_stack(stack)
        for role in ROLES:
            layer = 1 if role in LAYER_ROLES else None
            shape = (48, CFG.d_model) if role == "patch_embed" else (CFG.d_model, CFG.d_model)
            w = scheme.init(role, layer)(key, shape)
            assert w.shape == shape and 0 < float(jnp.std(w)) < 1.5, (stack, role)


def test_patch_embed_std_comes_from_the_kernel_fan_in():
    scheme = build_scheme({"name": "xavier"}, CFG)
    w = scheme.init("patch_embed", None)(jax.random.PRNGKey(0), (4, 4, 3, 128))
    assert float(jnp.std(w)) == pytest.approx(math.sqrt(2 / (48 + 128)), rel=0.05)


def test_stack_must_exist_in_the_architecture():
    with pytest.raises(ValueError, match="architecture='decoder_only' has no stack 'encoder'"):
        build_scheme({"name": "xavier"}, CFG).for_stack("encoder")


@pytest.mark.parametrize(("merged", "per_layer"), [(False, 3), (True, 2)])
def test_dslm_residual_beta_counts_the_decoder_sublayers(merged, per_layer):
    """beta^2 = k / (merges along the stream): [self, cross, FFN] or MAtt's [merged, FFN]."""
    cfg = dataclasses.replace(
        CFG, architecture="encoder_decoder", encoder_layers=2, merged_attention=merged
    )
    decoder = build_scheme({"name": "dslm", "k": 2.0}, cfg).for_stack("decoder")
    assert cfg.residual_merges("decoder") == per_layer * cfg.num_layers
    assert decoder.residual(0)[1] ** 2 == pytest.approx(2.0 / (per_layer * cfg.num_layers))
    encoder = decoder.for_stack("encoder")
    assert encoder.residual(0)[1] ** 2 == pytest.approx(2.0 / (2 * 2))


def test_merged_attention_needs_an_encoder_decoder_model():
    with pytest.raises(ValueError, match="model.merged_attention=True"):
        dataclasses.replace(CFG, merged_attention=True).validate()


def test_dslm_rejects_fix_norm():
    cfg = dataclasses.replace(CFG, tie_embeddings=True, fix_norm=True)
    with pytest.raises(ValueError, match="model.fix_norm=True"):
        build_scheme({"name": "dslm"}, cfg)
