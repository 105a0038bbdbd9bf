"""Token and position embeddings.

- `TokenEmbed`: a (vocab, d) table; `attend(h)` = h E^T gives tied output logits (Press & Wolf
  2017; Vaswani et al. 2017 sec. 3.4).
- Positions: learned (a (max_len, d) table) or sinusoidal,
  PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))
  (Vaswani et al. 2017, sec. 3.5).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepscale_jax.nn.initializers import Initializer


class TokenEmbed(nn.Module):
    vocab_size: int
    d_model: int
    embedding_init: Initializer
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
            (self.vocab_size, self.d_model),
            jnp.float32,
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied output logits h E^T, in float32."""
        return jnp.einsum("...d,vd->...v", h.astype(jnp.float32), self.embedding)


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
