"""Norms and embeddings: the math of each layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepscale_jax.nn.embed import sinusoidal_table
from deepscale_jax.nn.norms import LayerNorm, RMSNorm, make_norm


def _apply(module, x):
    params = module.init(jax.random.PRNGKey(0), x)
    return module.apply(params, x)


def test_layer_norm_standardises_each_token():
    x = 3.0 + 5.0 * jax.random.normal(jax.random.PRNGKey(1), (4, 7, 64))
    y = _apply(LayerNorm(eps=1e-6), x)
    np.testing.assert_allclose(jnp.mean(y, -1), 0.0, atol=1e-5)
    np.testing.assert_allclose(jnp.var(y, -1), 1.0, rtol=1e-4)


def test_rms_norm_is_scale_invariant_not_shift_invariant():
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 5, 32))
    norm = RMSNorm(eps=1e-8)
    np.testing.assert_allclose(_apply(norm, 7.5 * x), _apply(norm, x), rtol=1e-5, atol=1e-6)
    assert not np.allclose(_apply(norm, x + 1.0), _apply(norm, x), atol=1e-3)
    y = _apply(norm, x)
    np.testing.assert_allclose(jnp.mean(y**2, -1), 1.0, rtol=1e-4)


def test_rms_norm_equals_layer_norm_on_zero_mean_input():
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 4, 16))
    x = x - jnp.mean(x, -1, keepdims=True)
    np.testing.assert_allclose(_apply(RMSNorm(1e-6), x), _apply(LayerNorm(1e-6), x), atol=1e-5)


def test_unknown_norm_names_the_registry():
    with pytest.raises(ValueError, match="unknown model.norm='scale'; accepted: layer_norm, rms"):
        make_norm("scale", 1e-5, jnp.float32, "n")


def test_sinusoidal_table_matches_vaswani():
    table = sinusoidal_table(50, 16)
    pos, i = 7, 3
    np.testing.assert_allclose(table[pos, 2 * i], np.sin(pos / 10000 ** (2 * i / 16)), rtol=1e-6)
    np.testing.assert_allclose(
        table[pos, 2 * i + 1], np.cos(pos / 10000 ** (2 * i / 16)), rtol=1e-6
    )
    assert sinusoidal_table(5, 7).shape == (5, 7)
