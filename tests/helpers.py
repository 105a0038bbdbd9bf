"""Small shared builders for tests (tiny shapes)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models.lm import DecoderLM
from deepscale_jax.schemes import build_scheme

TINY = ModelConfig(
    vocab_size=64, num_layers=3, d_model=32, num_heads=4, d_ff=64, max_len=16, dropout=0.0
)


def tiny_lm(scheme: str = "xavier", **overrides) -> DecoderLM:
    cfg = dataclasses.replace(TINY, **overrides)
    return DecoderLM(cfg, build_scheme({"name": scheme}, cfg))


def tokens(batch: int = 2, length: int = 16, seed: int = 0, vocab: int = 64) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, vocab)


def init_params(model: DecoderLM, toks: jax.Array, seed: int = 0) -> dict:
    variables = jax.jit(model.init)(jax.random.PRNGKey(seed), toks)
    return nn.meta.unbox(variables)["params"]


def unstack_layers(scanned: dict, num_layers: int) -> dict:
    """Scanned layout (decoder/layers, leading axis N) -> unrolled (decoder/layer_000, ...)."""
    out = {k: v for k, v in scanned.items() if k != "decoder"}
    stacked = scanned["decoder"]["layers"]
    out["decoder"] = {
        f"layer_{i:03d}": jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(num_layers)
    }
    return out


def zeros_like_tokens(toks: jax.Array) -> jax.Array:
    return jnp.zeros_like(toks)
