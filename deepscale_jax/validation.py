"""Validate a whole experiment config once, early, with messages that name the field."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.optim import SCHEDULES
from deepscale_jax.schemes import Scheme, build_scheme
from deepscale_jax.tasks import get_task_class

SECTIONS = ("model", "scheme", "data", "optim", "train", "mesh", "ckpt")


def _positive_int(section: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = section[name]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{prefix}.{name}={value!r} must be a positive integer")


def validate_config(config: ml_collections.ConfigDict) -> tuple[ModelConfig, Scheme]:
    """Checks every section (the task's own fields through `Task.validate`); returns the typed
    model config and the built scheme."""
    missing = [s for s in SECTIONS if s not in config]
    if missing:
        raise ValueError(f"config has no section(s) {', '.join(missing)}; needs {SECTIONS}")
    model = ModelConfig.from_mapping(config.model.to_dict())
    scheme = build_scheme(config.scheme.to_dict(), model)

    if "task" not in config:
        raise ValueError("config has no task (e.g. config.task = 'lm')")
    task = get_task_class(config.task)
    train = config.train
    _positive_int(
        train,
        "train",
        "num_steps",
        "batch_size",
        "log_every_steps",
        "eval_every_steps",
        "max_bad_steps",
    )
    if (
        not isinstance(train.eval_batches, int)
        or train.eval_batches == 0
        or train.eval_batches < -1
    ):
        raise ValueError(
            f"train.eval_batches={train.eval_batches!r} must be a positive integer or -1 (all)"
        )

    optim = config.optim
    if optim.schedule not in SCHEDULES:
        raise ValueError(
            f"unknown optim.schedule={optim.schedule!r}; accepted: {', '.join(SCHEDULES)}"
        )
    if not optim.learning_rate > 0:
        raise ValueError(f"optim.learning_rate={optim.learning_rate!r} must be positive")
    if not isinstance(optim.warmup_steps, int) or optim.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps={optim.warmup_steps!r} must be an integer >= 0")
    if optim.clip_norm < 0:
        raise ValueError(f"optim.clip_norm={optim.clip_norm!r} must be >= 0 (0 = no clipping)")

    _positive_int(config.ckpt, "ckpt", "every_steps", "max_to_keep")
    task.validate(config, model)
    return model, scheme


def check_workdir(workdir: str) -> str:
    """The absolute workdir; its parent must exist (we create the workdir, not its parents)."""
    if not workdir:
        raise ValueError("--workdir is required (a directory for checkpoints and metrics)")
    path = os.path.abspath(os.path.expanduser(workdir))
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ValueError(
            f"--workdir={workdir!r}: its parent directory {parent!r} does not exist; "
            "create it first or choose another workdir"
        )
    return path
