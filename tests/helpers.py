"""Small shared builders for tests (tiny shapes)."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models.lm import DecoderLM
from deepscale_jax.nn.stack import unstack_layers
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


def unstack_model(scanned: dict, num_layers: int) -> dict:
    """Scanned model params (decoder/layers, leading axis N) -> unrolled (decoder/layer_000...)."""
    return {**scanned, "decoder": unstack_layers(scanned["decoder"], num_layers)}
