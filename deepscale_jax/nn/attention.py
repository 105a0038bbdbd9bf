"""Multi-head dot-product attention with per-projection initializers and explicit masks.

softmax(Q K^T / sqrt(d_head) + mask) V, then the output projection (Vaswani et al. 2017,
eq. 1). Q, K and V are separate projections so that a scheme can give each its own std
(DeepScaleLM needs sigma_qk != sigma_v; Kedia et al. 2024, sec. 2.1 of the reference).

Masks are boolean, True = may attend, shaped (batch, 1, q_len, kv_len). They are always
explicit, never `is_causal` (top-left aligned in jax), so extra key columns stay correct.

Paths (`model.attention_impl`):
- "xla": `jax.nn.dot_product_attention(implementation="xla")`.
- attention-probability dropout in training cannot go through that function, so it takes the
  explicit einsum path below (the same math, plus dropout on the probabilities).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepscale_jax.nn.initializers import LayerInit
from deepscale_jax.nn.linear import Dense


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


def explicit_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    dropout: nn.Dropout | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """Reference softmax attention on (B, T, H, D) tensors; softmax in float32."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout is not None:
        probs = dropout(probs, deterministic=deterministic)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)


class MultiHeadAttention(nn.Module):
    num_heads: int
    dropout_rate: float = 0.0
    impl: str = "xla"
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        init: LayerInit,
        deterministic: bool = True,
        context: jax.Array | None = None,
    ) -> jax.Array:
        """Self-attention of x, or attention from x to `context` (cross-attention) if given."""
        d_model = x.shape[-1]
        head_dim = d_model // self.num_heads
        kv_input = x if context is None else context

        def project(inputs: jax.Array, role: str) -> jax.Array:
            return Dense(
                (self.num_heads, head_dim),
                init.for_role(role),
                ("embed", "heads", "kv"),
                use_bias=self.use_bias,
                dtype=self.dtype,
                name=role,
            )(inputs)

        q = project(x, "q")
        k = project(kv_input, "k")
        v = project(kv_input, "v")
        if self.dropout_rate > 0.0 and not deterministic:
            dropout = nn.Dropout(self.dropout_rate, broadcast_dims=())
            out = explicit_attention(q, k, v, mask, dropout, deterministic)
        else:
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.impl)
        out = checkpoint_name(out, "attn_context")
        return Dense(
            (d_model,),
            init.for_role("attn_out"),
            ("heads", "kv", "embed"),
            num_in_axes=2,
            use_bias=self.use_bias,
            dtype=self.dtype,
            name="attn_out",
        )(out)
