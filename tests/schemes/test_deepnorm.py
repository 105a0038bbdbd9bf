"""DeepNorm: the published constants per architecture, Post-LN only, measured stds."""

import dataclasses

import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.schemes import build_scheme
from deepscale_jax.schemes.deepnorm import deepnorm_constants
from tests.schemes.stds import DEPTH_CASES, check_scheme_stds, fans, glorot

POST = ModelConfig(norm_placement="post")


@pytest.mark.parametrize(
    ("n", "alpha", "beta"), [(12, 2.2134, 0.3195), (48, 3.1302, 0.2259), (1000, 6.6874, 0.1057)]
)
@pytest.mark.parametrize("architecture", ["decoder_only", "encoder_only"])
def test_single_stack_constants(n, alpha, beta, architecture):
    cfg = dataclasses.replace(POST, num_layers=n, architecture=architecture)
    scheme = build_scheme({"name": "deepnorm"}, cfg)
    assert scheme.constants == pytest.approx((alpha, beta), abs=1e-4)
    assert scheme.residual(3) == pytest.approx((alpha, 1.0), abs=1e-4)


# variants.md 7.1, N = M: encoder (alpha, beta, torchscale beta), decoder (alpha, beta).
ENC_DEC = [
    (6, (1.4179, 0.4970, 0.6569), (2.0598, 0.3433)),
    (18, (1.9987, 0.3526, None), (2.7108, 0.2608)),
    (100, (3.4157, 0.2063, None), (4.1618, 0.1699)),
]


@pytest.mark.parametrize(("n", "enc", "dec"), ENC_DEC)
def test_encoder_decoder_constants(n, enc, dec):
    cfg = dataclasses.replace(POST, num_layers=n, architecture="encoder_decoder")
    assert deepnorm_constants(cfg, "encoder") == pytest.approx(enc[:2], abs=1e-4)
    assert deepnorm_constants(cfg, "decoder") == pytest.approx(dec, abs=1e-4)
    scheme = build_scheme({"name": "deepnorm"}, cfg)
    assert scheme.stack == "decoder" and scheme.constants == pytest.approx(dec, abs=1e-4)
    assert scheme.for_stack("encoder").residual(0)[0] == pytest.approx(enc[0], abs=1e-4)
    if enc[2] is not None:
        torchscale = build_scheme({"name": "deepnorm", "variant": "torchscale"}, cfg)
        assert torchscale.for_stack("encoder").constants[1] == pytest.approx(enc[2], abs=1e-4)


def test_unequal_encoder_decoder_depths():
    cfg = dataclasses.replace(POST, num_layers=6, encoder_layers=18, architecture="encoder_decoder")
    alpha, beta = deepnorm_constants(cfg, "encoder")
    mix = (18**4 * 6) ** (1 / 16)
    assert (alpha, beta) == pytest.approx((0.81 * mix, 0.87 / mix))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"norm_placement": "pre"},
            r"scheme 'deepnorm' is defined for model.norm_placement in \(post\); "
            r"got model.norm_placement='pre'",
        ),
        (
            {"norm": "none"},
            r"scheme 'deepnorm' needs model.norm in "
            r"\(layer_norm, rms_norm, prms_norm, scale_norm\); got model.norm='none'",
        ),
    ],
)
def test_bad_placement_or_norm_is_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_scheme({"name": "deepnorm"}, dataclasses.replace(POST, **overrides))


def test_bad_variant_is_named():
    with pytest.raises(ValueError, match="unknown scheme.variant='x'; accepted: paper, torchscale"):
        build_scheme({"name": "deepnorm", "variant": "x"}, POST)


def expected_std(role, layer, cfg):
    if role in ("embed", "pos_embed", "head"):
        return cfg.d_model**-0.5
    beta = (8 * cfg.num_layers) ** -0.25
    gain = 1.0 if role in ("q", "k") else beta
    return gain * glorot(*fans(role, cfg))


@pytest.mark.parametrize(("depth", "unrolled"), DEPTH_CASES)
def test_measured_stds(depth, unrolled):
    check_scheme_stds("deepnorm", expected_std, depth, unrolled, norm_placement="post")
