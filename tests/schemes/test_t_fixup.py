"""T-Fixup: its factors, the required norm=none, measured stds."""

import dataclasses
import math

import numpy as np
import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.schemes import build_scheme
from deepscale_jax.schemes.t_fixup import t_fixup_factor
from tests.schemes.stds import DEPTH_CASES, check_scheme_stds, fans, glorot, lm_config, lm_params

NONE = ModelConfig(norm="none")


def test_factors_n6():
    """variants.md 7.3: N = M = 6 gives 54^(-1/4) = 0.3689 and 0.67 * 6^(-1/4) = 0.4281."""
    cfg = dataclasses.replace(NONE, num_layers=6, architecture="encoder_decoder")
    assert t_fixup_factor(cfg, "decoder") == pytest.approx(0.3689, abs=1e-4)
    assert t_fixup_factor(cfg, "encoder") == pytest.approx(0.4281, abs=1e-4)
    scheme = build_scheme({"name": "t_fixup"}, cfg)
    d = cfg.d_model
    assert scheme.std("cross_v", 0) == pytest.approx(0.3689 * glorot(d, d), abs=1e-5)
    assert scheme.std("cross_q", 0) == pytest.approx(glorot(d, d))
    assert scheme.for_stack("encoder").std("ffn_in", 2) == pytest.approx(
        0.67 * 6**-0.25 * glorot(d, cfg.d_ff)
    )
    assert scheme.for_stack("encoder").std("embed", None) == pytest.approx(0.3689 * d**-0.5, 1e-3)


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm"])
def test_needs_norm_none(norm):
    with pytest.raises(
        ValueError, match=rf"scheme 't_fixup' needs model.norm in \(none\); got model.norm='{norm}'"
    ):
        build_scheme({"name": "t_fixup"}, ModelConfig(norm=norm))


def test_lm_has_no_norm_parameters_and_uniform_projections():
    params = lm_params("t_fixup", lm_config(4, norm="none"))
    layers = params["decoder"]["layers"]
    assert sorted(layers) == ["attn", "ffn"] and "final_norm" not in params
    w = layers["ffn"]["ffn_in"]["kernel"][0]
    bound = math.sqrt(3) * (9 * 4) ** -0.25 * glorot(64, 192)
    assert bound * 0.98 < np.max(np.abs(w)) <= bound * (1 + 1e-6)


def expected_std(role, layer, cfg):
    factor = (9 * cfg.num_layers) ** -0.25
    d = cfg.d_model
    if role in ("embed", "pos_embed"):
        return d**-0.5 * factor
    if role == "head":
        return d**-0.5
    base = glorot(*fans(role, cfg))
    return base if role in ("q", "k") else base * factor


@pytest.mark.parametrize(("depth", "unrolled"), DEPTH_CASES)
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_measured_stds(depth, unrolled, placement):
    if placement == "post" and depth == 48:
        pytest.skip("norm=none: the placements are the same computation; depth 4 covers post")
    check_scheme_stds(
        "t_fixup", expected_std, depth, unrolled, norm="none", norm_placement=placement
    )
