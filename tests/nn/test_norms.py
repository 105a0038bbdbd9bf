"""The norm registry (nn/norms.py): RMSNorm and pRMSNorm (Zhang & Sennrich 2019), ScaleNorm
(Nguyen & Salazar 2019), their invariances, the registry errors, and bfloat16 inputs."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn.norms import (
    NORMS,
    LayerNorm,
    PartialRMSNorm,
    RMSNorm,
    ScaleNorm,
    make_norm,
    norm_from_config,
    partial_features,
)

CFG = ModelConfig(d_model=32, num_heads=4)


def _params(module, x):
    return nn.meta.unbox(module.init(jax.random.PRNGKey(0), x))


def _apply(module, x, params=None):
    return module.apply(_params(module, x) if params is None else params, x)


def _x(shape=(3, 5, 32), seed=2, mean=0.0):
    return mean + jax.random.normal(jax.random.PRNGKey(seed), shape)


@pytest.mark.parametrize("norm", [RMSNorm(eps=1e-8), PartialRMSNorm(eps=1e-8)])
def test_rms_norms_are_scale_invariant_not_shift_invariant(norm):
    """RMSNorm(c x) = RMSNorm(x) for c > 0; RMSNorm(x + c 1) != RMSNorm(x) (unlike LayerNorm)."""
    x = _x()
    for c in (0.1, 7.5):  # eps = 1e-8 next to mean(x^2) >= 0.01: a 5e-7 effect
        np.testing.assert_allclose(_apply(norm, c * x), _apply(norm, x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(_apply(norm, x + 1.0), _apply(norm, x), atol=1e-2)
    ln = LayerNorm(eps=1e-8)
    np.testing.assert_allclose(_apply(ln, x + 1.0), _apply(ln, x), atol=1e-4)


def test_rms_norm_equals_bias_free_layer_norm_on_zero_mean_rows():
    x = _x()
    x = x - jnp.mean(x, -1, keepdims=True)
    ln = LayerNorm(eps=1e-6)
    params = _params(ln, x)
    assert not np.any(params["params"]["bias"])  # bias 0 at init: LayerNorm without a bias
    np.testing.assert_allclose(_apply(RMSNorm(1e-6), x), _apply(ln, x, params), atol=1e-5)


def test_rms_norm_matches_its_formula_and_has_unit_gains():
    x = _x()
    params = _params(RMSNorm(1e-5), x)
    np.testing.assert_array_equal(params["params"]["scale"], np.ones(32))
    assert set(params["params"]) == {"scale"}  # no bias
    expected = x / jnp.sqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(_apply(RMSNorm(1e-5), x, params), expected, rtol=1e-5)


def test_partial_features_is_the_ceiling_and_agrees_with_the_floor_on_integers():
    assert partial_features(512, 0.0625) == 32 == int(512 * 0.0625)  # the paper's setting
    assert partial_features(30, 0.1) == 3  # 0.1 * 30 = 3.0000000000000004 in floats
    assert partial_features(30, 0.0625) == 2  # ceil(1.875); the reference's floor gives 1
    assert partial_features(8, 0.01) == 1 and partial_features(8, 1.0) == 8
    with pytest.raises(ValueError, match=r"model.norm_partial_fraction=0.0 must lie in \(0, 1\]"):
        partial_features(8, 0.0)


def test_prms_norm_with_p_one_is_rms_norm():
    x = _x()
    np.testing.assert_allclose(
        _apply(PartialRMSNorm(1e-5, partial_fraction=1.0), x), _apply(RMSNorm(1e-5), x), rtol=1e-6
    )


def test_prms_norm_takes_its_statistic_from_the_first_k_features_only():
    d, p = 32, 0.25
    k = partial_features(d, p)
    norm = PartialRMSNorm(1e-5, partial_fraction=p)
    x = _x((4, d))
    y = _apply(norm, x)
    expected = x / jnp.sqrt(jnp.mean(x[:, :k] ** 2, -1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-5)
    # Features after k: only those outputs change, by the same factor as their inputs.
    x_tail = x.at[:, k:].multiply(3.0).at[:, -1].add(5.0)
    y_tail = _apply(norm, x_tail)
    np.testing.assert_array_equal(y_tail[:, :k], y[:, :k])
    np.testing.assert_allclose(y_tail[:, k:-1], 3.0 * y[:, k:-1], rtol=1e-6)
    # A feature before k changes the statistic, hence every output.
    y_head = _apply(norm, x.at[:, 0].add(5.0))
    ratio = y_head[:, 1:] / y[:, 1:]
    np.testing.assert_allclose(ratio, ratio[:, :1] * jnp.ones_like(ratio), rtol=1e-5)
    assert np.all(ratio < 0.9)


def test_scale_norm_output_norm_is_its_one_scalar_gain():
    d = 32
    x = _x((3, 5, d), mean=0.5)
    norm = ScaleNorm(eps=1e-5)
    params = _params(norm, x)
    g = params["params"]["scale"]
    assert set(params["params"]) == {"scale"} and g.shape == () and g.dtype == jnp.float32
    assert float(g) == pytest.approx(math.sqrt(d))
    np.testing.assert_allclose(
        jnp.linalg.norm(_apply(norm, x, params), axis=-1), math.sqrt(d), 1e-5
    )
    params = {"params": {"scale": jnp.float32(2.5)}}
    y = _apply(norm, x, params)
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), 2.5, rtol=1e-5)
    np.testing.assert_allclose(y, 2.5 * x / jnp.linalg.norm(x, axis=-1, keepdims=True), rtol=1e-5)


def test_scale_norm_clamps_the_norm_at_eps_with_finite_gradients():
    """g x / max(||x||, eps): a tiny row is scaled by g/eps, a zero row stays 0, grads finite."""
    norm = ScaleNorm(eps=1e-3)
    x = jnp.zeros((2, 8)).at[0, 0].set(1e-4)
    params = _params(norm, x)
    y = _apply(norm, x, params)
    np.testing.assert_allclose(y[0, 0], math.sqrt(8) * 1e-4 / 1e-3, rtol=1e-5)
    np.testing.assert_array_equal(y[1], 0.0)
    grad = jax.grad(lambda v: jnp.sum(norm.apply(params, v) ** 2))(x)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("name", list(NORMS))
def test_bfloat16_inputs_keep_statistics_in_float32(name):
    """A bf16 input gives the float32 result (on the same values) rounded once to bf16."""
    x = _x((4, 256), mean=0.3).astype(jnp.bfloat16)
    low = make_norm(name, 1e-5, jnp.bfloat16, "n")
    high = make_norm(name, 1e-5, jnp.float32, "n")
    params = _params(high, x.astype(jnp.float32))
    y = low.apply(params, x)
    assert y.dtype == jnp.bfloat16
    reference = high.apply(params, x.astype(jnp.float32))
    np.testing.assert_allclose(
        y.astype(jnp.float32), reference.astype(jnp.bfloat16).astype(jnp.float32), rtol=2**-8
    )


def test_unknown_norm_lists_the_registry():
    registry = "layer_norm, rms_norm, prms_norm, scale_norm, none"
    with pytest.raises(ValueError, match=f"unknown model.norm='batch'; accepted: {registry}$"):
        make_norm("batch", 1e-5, jnp.float32, "n")
    with pytest.raises(ValueError, match=f"unknown model.norm='batch'; accepted: {registry}$"):
        norm_from_config(dataclasses.replace(CFG, norm="batch"), "n")


def test_norm_from_config_passes_every_norm_field():
    cfg = dataclasses.replace(
        CFG, norm="prms_norm", norm_eps=1e-3, dtype="bfloat16", norm_partial_fraction=0.25
    )
    norm = norm_from_config(cfg, "final_norm")
    assert isinstance(norm, PartialRMSNorm) and norm.name == "final_norm"
    assert (norm.eps, norm.dtype, norm.partial_fraction) == (1e-3, jnp.bfloat16, 0.25)
    for name, cls in NORMS.items():
        built = norm_from_config(dataclasses.replace(CFG, norm=name), None)
        assert type(built) is cls and built.eps == CFG.norm_eps
    # make_norm keeps its positional form; the fraction is a keyword with the paper's default.
    assert make_norm("prms_norm", 1e-5, jnp.float32, "n").partial_fraction == 0.0625
    ones = jnp.ones((2, 32))
    for name in ("rms_norm", "scale_norm"):  # norms without a fraction ignore it
        make_norm(name, 1e-5, jnp.float32, "n", partial_fraction=0.5).init(
            jax.random.PRNGKey(0), ones
        )
