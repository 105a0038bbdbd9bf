"""Token and position embeddings.

- `TokenEmbed`: a (vocab, d) table; `attend(h)` = h E^T gives tied output logits (Press & Wolf
  2017; Vaswani et al. 2017 sec. 3.4). With `fix_norm` (FixNorm, Nguyen & Salazar 2019;
  variants.md sec. 2) both use the row-normalised table w_hat = w / ||w||_2: inputs
  sqrt(d) w_hat[token], logits h w_hat^T.
- Positions: learned (a (max_len, d) table) or sinusoidal,
  PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))
  (Vaswani et al. 2017, sec. 3.5).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepscale_jax.nn.initializers import Initializer

FIX_NORM_EPS = 1e-12  # the row-norm clamp of torch.nn.functional.normalize, used by the reference


def unit_rows(w: jax.Array) -> jax.Array:
    """w / max(||w||_2, 1e-12) row-wise (float32): `F.normalize(w, dim=-1)` of the reference."""
    w = w.astype(jnp.float32)
    sq = jnp.sum(jnp.square(w), axis=-1, keepdims=True)  # clamped squared: no NaN grad at 0
    return w * jax.lax.rsqrt(jnp.maximum(sq, FIX_NORM_EPS**2))


class TokenEmbed(nn.Module):
    """Token embedding table E (vocab, d), initialised by the scheme's "embed" role.

    fix_norm=False: E[tokens] in, h E^T out (tied).
    fix_norm=True (FixNorm, Nguyen & Salazar 2019; tnq177/transformers_without_tears model.py):
    with w_hat = w / ||w||_2 per row, the input is sqrt(d) w_hat[tokens] (every input row has norm
    sqrt(d), i.e. unit RMS) and the tied logits are h w_hat^T (without the sqrt(d)): after a
    final ScaleNorm of gain g they are g times cosine similarities. The reference also adds an
    output bias; the models here have no logit bias. The raw table keeps the scheme's init: the
    reference draws it from U(-0.01, 0.01) when fix_norm is on, but the normalisation removes
    every row's scale, so the forward pass sees only the rows' directions (uniform on the sphere
    for a Gaussian init, nearly so for the uniform one); the raw scale only sets the size of the
    gradient steps relative to w (d w_hat/d w = (I - w_hat w_hat^T)/||w||).
    """

    vocab_size: int
    d_model: int
    embedding_init: Initializer
    dtype: jnp.dtype = jnp.float32
    fix_norm: bool = False

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
            (self.vocab_size, self.d_model),
            jnp.float32,
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """E[tokens], or sqrt(d) w_hat[tokens] with fix_norm, in the compute dtype."""
        rows = jnp.take(self.embedding, tokens, axis=0)
        if self.fix_norm:  # normalising the gathered rows = gathering the normalised table
            rows = unit_rows(rows) * math.sqrt(self.d_model)
        return rows.astype(self.dtype)

    def output_matrix(self) -> jax.Array:
        """The (vocab, d) float32 matrix of the tied logits: E, or w_hat with fix_norm."""
        return unit_rows(self.embedding) if self.fix_norm else self.embedding

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied output logits h E^T (h w_hat^T with fix_norm), in float32: the matmul runs in
        h's dtype (bf16 on the fast path of a bf16 model) and accumulates in float32."""
        matrix = self.output_matrix().astype(h.dtype)
        return jnp.einsum("...d,vd->...v", h, matrix, preferred_element_type=jnp.float32)


def sinusoidal_table(max_len: int, d_model: int) -> np.ndarray:
    """(max_len, d_model) sinusoidal position table (sin on even, cos on odd features)."""
    positions = np.arange(max_len, dtype=np.float64)[:, None]
    rates = 1.0 / np.power(10000.0, np.arange(0, d_model, 2, dtype=np.float64) / d_model)
    table = np.zeros((max_len, d_model), np.float64)
    table[:, 0::2] = np.sin(positions * rates)
    table[:, 1::2] = np.cos(positions * rates)[:, : d_model // 2]
    return table.astype(np.float32)


class PositionEmbed(nn.Module):
    """Adds position embeddings ("learned" table or fixed "sinusoidal") to x of shape (B, T, d)."""

    max_len: int
    kind: str
    embedding_init: Initializer
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        length, d_model = x.shape[-2], x.shape[-1]
        if length > self.max_len:
            raise ValueError(
                f"sequence length {length} exceeds the position table: model.max_len={self.max_len}"
            )
        if self.kind == "none":
            return x
        if self.kind == "learned":
            table = self.param(
                "embedding",
                nn.with_logical_partitioning(self.embedding_init, ("length", "embed")),
                (self.max_len, d_model),
                jnp.float32,
            )
        elif self.kind == "sinusoidal":
            table = jnp.asarray(sinusoidal_table(self.max_len, d_model))
        else:
            raise ValueError(
                f"unknown model.position_embedding={self.kind!r}; "
                "accepted: learned, sinusoidal, none"
            )
        return x + table[:length].astype(self.dtype)
