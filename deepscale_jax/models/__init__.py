"""Task models over nn/, behind a registry by name (`model` key of the task config)."""

from __future__ import annotations

import flax.linen as nn

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models.lm import DecoderLM
from deepscale_jax.schemes.base import Scheme

MODELS: dict[str, type[nn.Module]] = {"lm": DecoderLM}


def build_model(task: str, model: ModelConfig, scheme: Scheme) -> nn.Module:
    if task not in MODELS:
        raise ValueError(f"unknown task={task!r}; accepted: {', '.join(MODELS)}")
    return MODELS[task](config=model, scheme=scheme)
