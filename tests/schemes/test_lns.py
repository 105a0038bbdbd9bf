"""LayerNorm Scaling: norm outputs times 1/sqrt(l), Pre-LN only, plain 0.02 init."""

import dataclasses

import jax
import numpy as np
import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models.lm import DecoderLM
from deepscale_jax.schemes import build_scheme
from tests.helpers import init_params, tokens
from tests.schemes.stds import DEPTH_CASES, check_scheme_stds

TINY = ModelConfig(vocab_size=64, num_layers=3, d_model=32, num_heads=4, d_ff=64, max_len=16)


def test_norm_scale_is_one_over_sqrt_l():
    scheme = build_scheme({"name": "lns"}, dataclasses.replace(TINY, num_layers=8))
    assert [scheme.norm_scale(i) for i in range(4)] == pytest.approx([1, 2**-0.5, 3**-0.5, 0.5])
    assert float(scheme.norm_scale(jax.numpy.int32(7))) == pytest.approx(8**-0.5)
    assert scheme.residual(2) == (1.0, 1.0)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
@pytest.mark.parametrize("scan", [True, False])
def test_scaling_the_norm_output_equals_scaling_the_next_projections(norm, scan):
    """Norm(x)/sqrt(l) feeds q, k, v and ffn_in, whose biases are 0 at init: the LNS model equals
    a plain Pre-LN model whose q, k, v, ffn_in kernels of layer l are divided by sqrt(l)."""
    cfg = dataclasses.replace(TINY, norm=norm, scan_layers=scan)
    toks = tokens()
    lns = DecoderLM(cfg, build_scheme({"name": "lns"}, cfg))
    plain = DecoderLM(cfg, build_scheme({"name": "default"}, cfg))
    params = init_params(lns, toks)
    scales = 1 / np.sqrt(np.arange(1, 4))

    def rescale(layer_params, scale):
        """q, k, v, ffn_in kernels times `scale` (per layer: leading axis under scan)."""
        out = jax.tree.map(lambda a: a, layer_params)
        for block, name in [("attn", "q"), ("attn", "k"), ("attn", "v"), ("ffn", "ffn_in")]:
            kernel = layer_params[block][name]["kernel"]
            factor = np.reshape(scale, np.shape(scale) + (1,) * (kernel.ndim - np.ndim(scale)))
            out[block][name]["kernel"] = kernel * factor
        return out

    decoder = params["decoder"]
    if scan:
        rescaled = {"layers": rescale(decoder["layers"], scales)}
    else:
        rescaled = {
            f"layer_{i:03d}": rescale(decoder[f"layer_{i:03d}"], s) for i, s in enumerate(scales)
        }
    got = jax.jit(lns.apply)({"params": params}, toks)
    want = jax.jit(plain.apply)({"params": {**params, "decoder": rescaled}}, toks)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, jax.jit(plain.apply)({"params": params}, toks), atol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"norm_placement": "post"},
            r"scheme 'lns' is defined for model.norm_placement in \(pre\); "
            r"got model.norm_placement='post'",
        ),
        ({"norm": "none"}, r"scheme 'lns' needs model.norm in \(layer_norm, rms_norm, prms_norm"),
    ],
)
def test_bad_placement_or_norm_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_scheme({"name": "lns"}, dataclasses.replace(TINY, **overrides))


@pytest.mark.parametrize(("depth", "unrolled"), DEPTH_CASES)
def test_measured_stds(depth, unrolled):
    check_scheme_stds("lns", lambda role, layer, cfg: 0.02, depth, unrolled)
