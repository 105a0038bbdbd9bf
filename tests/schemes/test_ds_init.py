"""DS-Init: the reference's bound table, uniform draws, per-stack layer index, measured stds."""

import math

import numpy as np
import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.schemes import build_scheme
from tests.schemes.stds import DEPTH_CASES, check_scheme_stds, fans, glorot, lm_config, lm_params

# variants.md 1.3: bounds of a d x d matrix, d = 512, alpha = gain = 1.
BOUNDS = {
    1: (0.07655, 0.07655),
    6: (0.03125, 0.04891),
    12: (0.02210, 0.04113),
    30: (0.01398, 0.03271),
}


@pytest.mark.parametrize("index", sorted(BOUNDS))
@pytest.mark.parametrize("mode", ["paper", "zero_code"])
def test_bound_table_d512(index, mode):
    cfg = ModelConfig(d_model=512, num_heads=8, d_ff=2048, num_layers=30)
    scheme = build_scheme({"name": "ds_init", "mode": mode}, cfg)
    want = BOUNDS[index][0 if mode == "paper" else 1]
    for role in ("q", "v", "attn_out"):
        assert math.sqrt(3) * scheme.std(role, index - 1) == pytest.approx(want, abs=5e-6)


def test_alpha_and_gain_options():
    cfg = ModelConfig(d_model=512, num_heads=8, d_ff=2048, num_layers=8)
    base = glorot(512, 512)
    paper = build_scheme({"name": "ds_init", "alpha": 0.5}, cfg)
    assert paper.std("q", 3) == pytest.approx(base * 0.5 / 2)
    code = build_scheme({"name": "ds_init", "mode": "zero_code", "gain": 4.0}, cfg)
    assert code.std("ffn_out", 15 - 8) == pytest.approx(glorot(2048, 512) * 2 * 8**-0.25)


def test_layer_index_counts_within_each_stack():
    cfg = ModelConfig(num_layers=6, encoder_layers=3, architecture="encoder_decoder")
    decoder = build_scheme({"name": "ds_init"}, cfg)
    encoder = decoder.for_stack("encoder")
    assert decoder.stack == "decoder" and encoder.stack == "encoder"
    assert encoder.depth == 3 and decoder.depth == 6
    assert encoder.std("q", 0) == decoder.std("q", 0) == pytest.approx(glorot(128, 128))
    assert decoder.std("cross_v", 5) == pytest.approx(glorot(128, 128) / math.sqrt(6))


def test_weights_are_uniform_within_the_bound():
    cfg = lm_config(4)
    params = lm_params("ds_init", cfg, (("mode", "paper"),))
    q = params["decoder"]["layers"]["attn"]["q"]["kernel"]
    for layer in range(4):
        bound = glorot(64, 64) * math.sqrt(3) / math.sqrt(layer + 1)
        assert np.max(np.abs(q[layer])) <= bound * (1 + 1e-6)
        assert np.max(np.abs(q[layer])) > 0.98 * bound  # uniform fills its range


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="unknown scheme.mode='fast'; accepted: paper, zero_code"):
        build_scheme({"name": "ds_init", "mode": "fast"}, ModelConfig())


def expected(mode):
    def std(role, layer, cfg):
        if role in ("embed", "pos_embed"):
            return cfg.d_model**-0.5
        base = glorot(*fans(role, cfg))
        if layer is None:
            return base
        index = layer + 1
        return base / math.sqrt(index) if mode == "paper" else base * index**-0.25

    return std


@pytest.mark.parametrize("mode", ["paper", "zero_code"])
@pytest.mark.parametrize(("depth", "unrolled"), DEPTH_CASES)
def test_measured_stds(mode, depth, unrolled):
    check_scheme_stds("ds_init", expected(mode), depth, unrolled, (("mode", mode),))


def test_measured_stds_post_ln():
    check_scheme_stds("ds_init", expected("paper"), 4, False, norm_placement="post")
