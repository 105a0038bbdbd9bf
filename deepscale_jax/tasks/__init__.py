"""Tasks behind a registry by name (`config.task`); see tasks/base.py for the interface."""

from __future__ import annotations

import ml_collections

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.schemes.base import Scheme
from deepscale_jax.tasks.base import Task
from deepscale_jax.tasks.lm import LanguageModelTask
from deepscale_jax.tasks.mlm import MaskedLanguageModelTask
from deepscale_jax.tasks.seq2seq import Seq2SeqTask
from deepscale_jax.tasks.vit import ImageClassificationTask

TASKS: dict[str, type[Task]] = {
    cls.name: cls
    for cls in (
        LanguageModelTask,
        MaskedLanguageModelTask,
        ImageClassificationTask,
        Seq2SeqTask,
    )
}


def get_task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"unknown task={name!r}; accepted: {', '.join(TASKS)}")
    return TASKS[name]


def build_task(config: ml_collections.ConfigDict, model: ModelConfig, scheme: Scheme) -> Task:
    """The task `config.task` with its model built from `model` and `scheme`."""
    return get_task_class(config.task)(config, model, scheme)


__all__ = ["TASKS", "Task", "build_task", "get_task_class"]
