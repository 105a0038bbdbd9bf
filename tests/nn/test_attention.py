"""Attention paths agree; masks are explicit."""

import jax
import jax.numpy as jnp
import numpy as np

from deepscale_jax.nn.attention import causal_mask, combine_masks, explicit_attention, padding_mask


def _qkv(seed=0, b=2, t=8, h=2, d=4):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    shape = (b, t, h, d)
    return (jax.random.normal(k, shape) for k in (k1, k2, k3))


def test_explicit_path_matches_jax_dot_product_attention():
    q, k, v = _qkv()
    valid = jnp.ones((2, 8), bool).at[1, 6:].set(False)
    mask = combine_masks(causal_mask(8), padding_mask(valid, valid))
    ref = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
    out = explicit_attention(q, k, v, mask)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1, :6], ref[1, :6], rtol=1e-5, atol=1e-6)


def test_explicit_path_matches_naive_softmax():
    q, k, v = _qkv(1)
    logits = jnp.einsum("bthd,bshd->bhts", q, k) / 2.0
    logits = jnp.where(jnp.tril(jnp.ones((8, 8), bool)), logits, -jnp.inf)
    ref = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1), v)
    np.testing.assert_allclose(explicit_attention(q, k, v, causal_mask(8)), ref, atol=1e-6)


def test_causal_mask_is_lower_triangular():
    m = np.asarray(causal_mask(4))[0, 0]
    assert m[2, 2] and m[3, 0] and not m[0, 1]
