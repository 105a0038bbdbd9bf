"""Attention paths agree; masks are explicit."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn.attention import (
    CROSS_ROLES,
    MultiHeadAttention,
    causal_average,
    causal_mask,
    combine_masks,
    explicit_attention,
    padding_mask,
)
from deepscale_jax.nn.initializers import LayerInit
from deepscale_jax.schemes import build_scheme


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


def test_matt_is_averaged_self_attention_plus_cross_attention_with_tied_v_and_o():
    """MAtt(S, H) = [M_a (S W_v) + softmax(...) (H W_v)] W_o (variants.md sec. 1.4): with the same
    weights, MAtt minus plain cross-attention is the SAAN branch (M_a (S W_v + b_v)) W_o."""
    cfg = ModelConfig(d_model=16, num_heads=2, architecture="encoder_decoder")
    init = LayerInit(build_scheme({"name": "xavier"}, cfg).for_stack("decoder"))
    rng = np.random.default_rng(0)
    s = jnp.asarray(rng.normal(size=(2, 5, 16)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
    target_valid = jnp.asarray([[True] * 5, [True] * 3 + [False] * 2])
    merged = MultiHeadAttention(2, roles=CROSS_ROLES, merged=True)
    cross = MultiHeadAttention(2, roles=CROSS_ROLES)
    params = merged.init(jax.random.PRNGKey(0), s, None, init, True, h, target_valid)["params"]
    params = nn.unbox(params)
    out = merged.apply({"params": params}, s, None, init, True, h, target_valid)
    plain = cross.apply({"params": params}, s, None, init, True, h)
    v, o = params["cross_v"], params["cross_out"]
    values = jnp.einsum("btd,dhk->bthk", s, v["kernel"]) + v["bias"]
    saan = jnp.einsum("bthk,hkd->btd", causal_average(values, target_valid), o["kernel"])
    np.testing.assert_allclose(out, plain + saan, atol=1e-5)
