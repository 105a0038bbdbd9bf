"""Task models over nn/, behind a registry by name (`config.task`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models.lm import DecoderLM
from deepscale_jax.models.mlm import EncoderMLM
from deepscale_jax.models.seq2seq import Seq2Seq, Seq2SeqConfig
from deepscale_jax.models.vit import ViT, ViTConfig
from deepscale_jax.schemes.base import Scheme

MODELS: dict[str, type[nn.Module]] = {
    "lm": DecoderLM,
    "mlm": EncoderMLM,
    "vit": ViT,
    "seq2seq": Seq2Seq,
}


def build_model(task: str, model: ModelConfig, scheme: Scheme, **extra: Any) -> nn.Module:
    """`MODELS[task](config=model, scheme=scheme, **extra)`; `extra` holds a model's own
    task-specific settings (e.g. `vit=ViTConfig(...)`)."""
    if task not in MODELS:
        raise ValueError(f"unknown task={task!r}; accepted: {', '.join(MODELS)}")
    return MODELS[task](config=model, scheme=scheme, **extra)


__all__ = [
    "MODELS",
    "DecoderLM",
    "EncoderMLM",
    "Seq2Seq",
    "Seq2SeqConfig",
    "ViT",
    "ViTConfig",
    "build_model",
]
