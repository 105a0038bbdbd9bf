"""Memory tokens (Burtsev et al. 2020, "Memory Transformer"; variants.md sec. 5), shared by the
models that take them (`model.memory_tokens` = m > 0).

m learned [mem] vectors X^mem in R^{m x d} (role "embed": they are embedding rows) are put in
front of the embedded sequence: X = [X^mem ; X^seq]. They carry no position: each slot is its own
learned vector already, and the sequence keeps positions 0..T-1 (so `model.max_len` is unchanged).
The model's outputs drop the m memory rows (`strip_memory`); an encoder-decoder decoder
cross-attends to all m + T encoder outputs.

`model.memory_mode`:
- "prepend" (MemTransformer): the m + T rows go through the ordinary layers. In a bidirectional
  stack every row sees every memory row and every valid sequence row. In a causal stack a
  sequence row sees all memory rows and the sequence causally; memory rows see memory rows only
  (were they to read the sequence, layer l+1 would pass later tokens to earlier ones).
- "bottleneck" (MemBottleneck), bidirectional stacks only: per layer, the memory reads
  [memory ; sequence], then the sequence reads the updated memory only (nn/block.py
  `BottleneckLayer`), so all global information passes through the m slots.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn.initializers import LayerInit
from deepscale_jax.schemes.base import Scheme


class MemoryTokens(nn.Module):
    """[X^mem ; x]: (B, m + T, d) from x (B, T, d); X^mem is the (m, d) parameter "embedding"."""

    num_tokens: int
    embedding_init: object
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, (None, "embed")),
            (self.num_tokens, x.shape[-1]),
            jnp.float32,
        )
        memory = jnp.broadcast_to(table.astype(x.dtype), (x.shape[0], *table.shape))
        return jnp.concatenate([memory, x], axis=1)


def prepend_memory(x: jax.Array, cfg: ModelConfig, scheme: Scheme) -> jax.Array:
    """x with the model's memory tokens in front (a submodule "memory" of the calling module);
    x unchanged if `model.memory_tokens` is 0."""
    if not cfg.memory_tokens:
        return x
    init = LayerInit(scheme).for_role("embed")
    return MemoryTokens(cfg.memory_tokens, init, jnp.dtype(cfg.dtype), name="memory")(x)


def strip_memory(x: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The sequence rows of x (B, m + T, ...): x[:, m:]."""
    return x[:, cfg.memory_tokens :]


def memory_valid(valid: jax.Array | None, batch: int, length: int, m: int) -> jax.Array:
    """(B, m + T) validity of [memory ; sequence]: memory slots are always valid."""
    if valid is None:
        valid = jnp.ones((batch, length), bool)
    return jnp.concatenate([jnp.ones((valid.shape[0], m), bool), valid.astype(bool)], axis=1)


def memory_mask(
    valid: jax.Array | None, batch: int, length: int, cfg: ModelConfig, causal: bool
) -> jax.Array:
    """The (B, 1, m + T, m + T) attention mask over [memory ; sequence] of a "prepend" stack
    (see the module docstring), or the (B, 1, 1, m + T) key mask of a "bottleneck" stack
    (the memory reads every memory slot and valid token)."""
    m = cfg.memory_tokens
    keys = memory_valid(valid, batch, length, m)  # (B, m + T)
    if cfg.memory_mode == "bottleneck":
        if causal:
            raise ValueError(
                "model.memory_mode='bottleneck' needs a bidirectional stack: in a causal one "
                "the memory would pass later tokens to earlier ones; use 'prepend'"
            )
        return keys[:, None, None, :]
    total = m + length
    rows = jnp.arange(total)[:, None]
    cols = jnp.arange(total)[None, :]
    if causal:
        seq_rows = (cols < m) | ((cols >= m) & (cols <= rows))
        allowed = jnp.where(rows < m, cols < m, seq_rows)
    else:
        allowed = jnp.ones((total, total), bool)
    return allowed[None, None] & keys[:, None, None, :]
