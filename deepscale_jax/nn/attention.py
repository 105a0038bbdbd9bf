"""Multi-head dot-product attention with per-projection initializers and explicit masks.

softmax(Q K^T / sqrt(d_head) + mask) V, then the output projection (Vaswani et al. 2017,
eq. 1). Q, K and V are separate projections so that a scheme can give each its own std
(DeepScaleLM needs sigma_qk != sigma_v; Kedia et al. 2024, sec. 2.1 of the reference).

Masks are True = may attend and never `is_causal` (top-left aligned in jax), so extra key
columns stay correct. Either a dense boolean (batch or 1, 1, q_len, kv_len) array
(`causal_mask`, `padding_mask`, `combine_masks`) or a structured `MaskSpec` (causal or full,
key padding, always-visible memory columns after the context), which every kernel takes.

The kernel is `model.attention_impl` (auto | xla | cudnn | splash | pallas_gpu), run by
`nn.attention_backends.attend`: "xla" is `jax.nn.dot_product_attention(implementation="xla")`;
"cudnn", "splash" (TPU) and "pallas_gpu" are fused flash-attention kernels with their own
constraints (splash and pallas_gpu take only `MaskSpec` masks); "auto" picks the fastest that
can run and logs why once. Attention-probability dropout in training is in no fused kernel, so
it takes the explicit einsum path (`explicit_attention`: the same math plus dropout), whatever
the impl. Cached one-token decoding always uses "xla".

The same module serves cross-attention (roles cross_q/k/v/out), MAtt (`merged`, Zhang et al.
2019) and cached one-token decoding (`decode`); see `MultiHeadAttention`.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepscale_jax.nn.attention_backends import (
    MaskSpec,
    attend,
    dense_mask,
    explicit_attention,
)
from deepscale_jax.nn.initializers import LayerInit
from deepscale_jax.nn.linear import Dense
from deepscale_jax.nn.memory import PersistentMemory, append_memory, with_memory_columns

__all__ = [
    "CROSS_ROLES",
    "FUSED_QKV",
    "SELF_ROLES",
    "MaskSpec",
    "MultiHeadAttention",
    "causal_average",
    "causal_mask",
    "combine_masks",
    "explicit_attention",
    "padding_mask",
]


def causal_mask(length: int) -> jax.Array:
    """(1, 1, T, T) lower-triangular: query t sees keys 0..t."""
    return jnp.tril(jnp.ones((length, length), bool))[None, None]


def padding_mask(query_valid: jax.Array, key_valid: jax.Array) -> jax.Array:
    """(B, 1, Tq, Tk) from per-token validity (B, Tq) and (B, Tk)."""
    return query_valid[:, None, :, None] & key_valid[:, None, None, :]


def combine_masks(*masks: jax.Array | None) -> jax.Array | None:
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = out & m
    return out


SELF_ROLES = ("q", "k", "v", "attn_out")
FUSED_QKV = "qkv"  # the parameter name of the fused self-attention projection
CROSS_ROLES = ("cross_q", "cross_k", "cross_v", "cross_out")


def causal_average(v: jax.Array, valid: jax.Array | None) -> jax.Array:
    """The averaged self-attention of MAtt / AAN on (B, T, H, D) values: output i is the uniform
    mean of v_j over the valid positions j <= i, i.e. M_a v with M_a[i, j] = 1/i for j <= i
    (1-based; Zhang, Titov & Sennrich 2019, sec. 3.2; variants.md sec. 1.4). A position with no
    valid j <= i (a leading pad) gets 0."""
    if valid is None:
        valid = jnp.ones(v.shape[:2], bool)
    w = valid.astype(jnp.float32)[:, :, None, None]
    sums = jnp.cumsum(v.astype(jnp.float32) * w, axis=1)
    counts = jnp.maximum(jnp.cumsum(w, axis=1), 1.0)
    return (sums / counts).astype(v.dtype)


class MultiHeadAttention(nn.Module):
    """Self-attention (`context=None`) or cross-attention to `context`.

    `roles` names the four projections (q, k, v, out) for the scheme and the parameters:
    `SELF_ROLES` or `CROSS_ROLES`. `merged=True` is MAtt (Zhang et al. 2019, variants.md 1.4):
    with W_v and W_o shared by both branches,
        MAtt(S, H) = [ M_a (S W_v) + softmax((S W_q)(H W_k)^T / sqrt(d_h) + mask) (H W_v) ] W_o,
    where M_a is the causal uniform average (`causal_average`, over `query_valid`).

    `decode=True` is one-token-at-a-time decoding with a "cache" collection. The first call
    (the collection mutable and still empty, any query length) computes as in training and
    creates the cache: zero self-attention keys/values of the query length (the maximum
    decoding length), the cross-attention keys/values of `context` (computed once per
    sentence), a zero MAtt running sum. Each later call takes queries of length 1 at step
    t = cache_index: self-attention writes k_t, v_t at row t and attends to rows <= t; MAtt
    keeps sum_{k<=t} v_k and outputs it / (t + 1); cross-attention reads the cached keys and
    values (`context` is then unused).

    `persistent_memory` = N > 0 joins N learned key/value slots per head to the keys and values
    of self-attention, visible to every query (nn/memory.py; Sukhbaatar et al. 2019).

    `fused_qkv=True` computes self-attention's Q, K and V with one matmul against a stacked
    (d, 3, H, D) kernel named `FUSED_QKV`, each slice initialised as its role
    (`_fused_projection`). Attention to a `context` (cross-attention, MAtt, memory reads) keeps
    separate projections: its queries and keys/values read different inputs.
    """

    num_heads: int
    dropout_rate: float = 0.0
    impl: str = "xla"
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    roles: tuple[str, str, str, str] = SELF_ROLES
    merged: bool = False
    decode: bool = False
    persistent_memory: int = 0
    fused_qkv: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | MaskSpec | None,
        init: LayerInit,
        deterministic: bool = True,
        context: jax.Array | None = None,
        query_valid: jax.Array | None = None,
    ) -> jax.Array:
        """Self-attention of x, or attention from x to `context` (cross-attention) if given.
        `query_valid` (B, T) is the target padding of MAtt's averaged branch."""
        d_model = x.shape[-1]
        head_dim = d_model // self.num_heads
        q_role, k_role, v_role, out_role = self.roles

        def dense(role: str) -> Dense:
            return Dense(
                (self.num_heads, head_dim),
                init.for_role(role),
                ("embed", "heads", "kv"),
                use_bias=self.use_bias,
                dtype=self.dtype,
                name=role,
            )

        if self.merged and context is None:
            raise ValueError("merged attention (MAtt) needs the encoder output as context")
        q_proj, k_proj, v_proj = dense(q_role), dense(k_role), dense(v_role)
        fused = self.fused_qkv and context is None
        if fused:
            q, k, v = self._fused_projection(x, init, head_dim)
        else:
            q = q_proj(x)
        cached = self.decode and self.has_variable("cache", "cache_index")
        if self.decode:
            index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if context is None:  # self-attention
            if not fused:
                k, v = k_proj(x), v_proj(x)
            if self.decode:
                k, v, mask = self._self_cache(k, v, cached, index.value, mask)
            if self.persistent_memory:
                k, v, mask = self._with_persistent_memory(k, v, mask, head_dim)
        elif cached:
            k = self.variable("cache", "cross_key", jnp.zeros, ()).value
            v = self.variable("cache", "cross_value", jnp.zeros, ()).value
        else:
            k, v = k_proj(context), v_proj(context)
            if self.decode:
                self.variable("cache", "cross_key", lambda: k)
                self.variable("cache", "cross_value", lambda: v)
        dropout = None
        if self.dropout_rate > 0.0 and not deterministic:
            dropout = nn.Dropout(self.dropout_rate, broadcast_dims=())
        impl = "xla" if cached else self.impl  # one query row: nothing to fuse
        out = attend(q, k, v, mask, impl, dropout=dropout, deterministic=deterministic)
        if self.merged:
            v_self = v_proj(x)
            if cached:
                running = self.variable("cache", "running_sum", jnp.zeros, ())
                running.value = running.value + v_self.astype(jnp.float32)
                step = (index.value + 1).astype(jnp.float32)
                average = (running.value / step).astype(v_self.dtype)
            else:
                average = causal_average(v_self, query_valid)
                if self.decode:
                    shape = v_self[:, :1].shape
                    self.variable("cache", "running_sum", jnp.zeros, shape, jnp.float32)
            out = out + average
        if cached:
            index.value = index.value + 1
        out = checkpoint_name(out, "attn_context")
        return Dense(
            (d_model,),
            init.for_role(out_role),
            ("heads", "kv", "embed"),
            num_in_axes=2,
            use_bias=self.use_bias,
            dtype=self.dtype,
            name=out_role,
        )(out)

    def _fused_projection(self, x, init, head_dim):
        """Q, K and V of self-attention from one (d, 3, H, D) kernel "qkv": one matmul of width
        3d instead of three of width d. Slice i of the kernel (and bias) is role i's weight,
        drawn as the separate projection would draw it (`LayerInit.for_roles`), so the scheme's
        per-role std holds and a fused model starts from the unfused model's numbers."""
        roles = self.roles[:3]
        qkv = Dense(
            (len(roles), self.num_heads, head_dim),
            init.for_roles(roles, axis=1),
            ("embed", None, "heads", "kv"),
            use_bias=self.use_bias,
            dtype=self.dtype,
            name=FUSED_QKV,
        )(x)
        return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]

    def _with_persistent_memory(self, k, v, mask, head_dim):
        """Keys/values [context ; N persistent slots] and the mask with N always-visible
        columns (nn/memory.py; Sukhbaatar et al. 2019)."""
        n = self.persistent_memory
        memory = PersistentMemory(n, self.num_heads, head_dim, self.dtype, name="persistent")()
        k, v = append_memory(k, v, memory)
        if isinstance(mask, MaskSpec):
            mask = dataclasses.replace(mask, memory_columns=mask.memory_columns + n)
        else:
            mask = with_memory_columns(mask, n)
        return k, v, mask

    def _self_cache(self, k, v, cached, index, mask):
        """Decoding: before the cache exists, create zero (B, L, H, D) key/value rows and
        attend as in training; afterwards write row `index` and attend to rows <= index."""
        cache_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cache_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        if not cached:
            return k, v, mask
        if k.shape[1] != 1:
            raise ValueError(f"cached decoding takes one token per call, got {k.shape[1]}")
        start = (0, index, 0, 0)
        cache_k.value = jax.lax.dynamic_update_slice(cache_k.value, k, start)
        cache_v.value = jax.lax.dynamic_update_slice(cache_v.value, v, start)
        length = cache_k.value.shape[1]
        step_mask = (jnp.arange(length) <= index)[None, None, None, :]
        if isinstance(mask, MaskSpec):  # the step mask is the causal part at row `index`
            mask = dense_mask(dataclasses.replace(mask, causal=False), 1, length)
        return cache_k.value, cache_v.value, combine_masks(step_mask, mask)
