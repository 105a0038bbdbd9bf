"""Persistent memory: learned key/value vectors joined to an attention's context
(Sukhbaatar et al. 2019, "Augmenting Self-attention with Persistent Memory"; variants.md sec. 4).

Every head h gets N learned vectors M_k^h, M_v^h in R^{N x d_h}, shared by all positions and
sequences, appended to its keys and values so that one softmax runs over context and memory:
    K_h = [X W_k^h ; M_k^h],   V_h = [X W_v^h ; M_v^h],
    a_t = softmax([q_t . k_i (context) , q_t . m_k,j (memory)] / sqrt(d_h)).
Memory columns are visible to every query (a causal mask covers the context columns only), so
masks are extended with always-True columns (`with_memory_columns`), never `is_causal`.

Init, as the reference code (facebookresearch/adaptive-span, persistent_memory.py): the stored
key is N(0, 1) / sqrt(d_h) and is used times sqrt(d_h); the stored value is N(0, 1) / sqrt(N)
and is used times sqrt(N). The effective keys and values start N(0, 1); the split changes the
step size the optimizer sees on them. They take no scheme role: the method fixes them.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def _scaled_normal(scale: float):
    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.normal(key, shape, dtype) * scale

    return init


class PersistentMemory(nn.Module):
    """(keys, values), each (1, N, H, D): the effective persistent vectors of every head."""

    num_slots: int
    num_heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        n, h, d = self.num_slots, self.num_heads, self.head_dim
        key = self.param(
            "memory_key",
            nn.with_logical_partitioning(_scaled_normal(1.0 / math.sqrt(d)), (None, "heads", "kv")),
            (n, h, d),
            jnp.float32,
        )
        value = self.param(
            "memory_value",
            nn.with_logical_partitioning(_scaled_normal(1.0 / math.sqrt(n)), (None, "heads", "kv")),
            (n, h, d),
            jnp.float32,
        )
        keys = (key * math.sqrt(d)).astype(self.dtype)[None]
        values = (value * math.sqrt(n)).astype(self.dtype)[None]
        return keys, values


def with_memory_columns(mask: jax.Array | None, num_slots: int) -> jax.Array | None:
    """`mask` (B, 1, Tq, Tk) with `num_slots` always-visible key columns appended (None stays
    None: no mask means every column is visible)."""
    if mask is None:
        return None
    visible = jnp.ones((*mask.shape[:-1], num_slots), bool)
    return jnp.concatenate([mask, visible], axis=-1)


def append_memory(
    k: jax.Array, v: jax.Array, memory: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """Context keys/values (B, S, H, D) followed by the memory's (N rows): (B, S + N, H, D)."""
    mk, mv = memory
    batch = k.shape[0]
    mk = jnp.broadcast_to(mk, (batch, *mk.shape[1:])).astype(k.dtype)
    mv = jnp.broadcast_to(mv, (batch, *mv.shape[1:])).astype(v.dtype)
    return jnp.concatenate([k, mk], axis=1), jnp.concatenate([v, mv], axis=1)
