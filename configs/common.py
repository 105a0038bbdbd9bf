"""Shared config pieces: the base sections, presets, and `preset,key=value` argument parsing.

A task file (`configs/lm.py`) defines `PRESETS` and calls `build(base_config(task), PRESETS, arg)`.
`arg` is what follows the colon in `--config=configs/lm.py:ARG`: an optional preset name followed
by comma-separated `key=value` overrides, where `key` is a dotted path (`model.num_layers=96`) or a
short alias (`layers=96`). Values are parsed with the type of the field they replace. Any field
can also be overridden on the command line with `--config.model.num_layers=96`.

The scheme section holds `name` and every scheme's options at their defaults
(`schemes.scheme_option_defaults`), so a scheme's option can be set whichever scheme a preset
chose and in any order: `--config=configs/lm.py:smoke,scheme=dslm,scheme.k=4` or
`--config=configs/lm.py:smoke,scheme=dslm --config.scheme.k=4`. Options of schemes other than the
chosen one must stay at their defaults (`schemes.build_scheme` names any that do not).
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.schemes import scheme_option_defaults

ALIASES: dict[str, str] = {
    "layers": "model.num_layers",
    "width": "model.d_model",
    "d_model": "model.d_model",
    "heads": "model.num_heads",
    "norm": "model.norm",
    "placement": "model.norm_placement",
    "scan": "model.scan_layers",
    "remat": "model.remat_policy",
    "scheme": "scheme.name",
    "steps": "train.num_steps",
    "batch": "train.batch_size",
    "seq": "train.seq_len",
    "lr": "optim.learning_rate",
    "seed": "train.seed",
}


def base_config(task: str) -> ml_collections.ConfigDict:
    """Every section with its defaults; model defaults come from `ModelConfig`."""
    config = ml_collections.ConfigDict()
    config.task = task
    config.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))
    config.scheme = ml_collections.ConfigDict({"name": "xavier", **scheme_option_defaults()})
    config.data = ml_collections.ConfigDict({"name": "shakespeare", "data_dir": None})
    config.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    config.optim = ml_collections.ConfigDict(
        {
            "learning_rate": 1e-3,
            "schedule": "cosine",
            "warmup_steps": 100,
            "end_lr_factor": 0.1,
            "b1": 0.9,
            "b2": 0.98,
            "eps": 1e-9,
            "weight_decay": 0.01,
            "clip_norm": 1.0,
        }
    )
    config.train = ml_collections.ConfigDict(
        {
            "num_steps": 1000,
            "batch_size": 32,
            "seq_len": 256,
            "seed": 0,
            "log_every_steps": 20,
            "eval_every_steps": 200,
            "eval_batches": 16,
            # Consecutive steps with a non-finite loss or gradient (each skipped) before the
            # run stops with an error naming the last good checkpoint (deepscale_jax/train.py).
            "max_bad_steps": 10,
            # > 1: log the layer whose gradient norm jumped when a log interval's largest loss
            # exceeds this multiple of the loss's moving average (deepscale_jax/spikes.py);
            # 0 = off (no per-layer norms computed).
            "spike_factor": 0.0,
            # Batches placed on the devices ahead of the step that takes them
            # (deepscale_jax/data/device_feed.py); 0 = transfer each batch when it is taken.
            "prefetch_batches": 2,
        }
    )
    config.mesh = ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "tensor": 1}})
    config.ckpt = ml_collections.ConfigDict({"every_steps": 200, "max_to_keep": 2})
    return config


def parse_value(text: str, current: Any) -> Any:
    """`text` as the type of `current` (bool accepts true/false/1/0)."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {text!r}")
        return lowered in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_path(config: ml_collections.ConfigDict, path: str, text: str) -> None:
    """Sets the dotted `path` (or alias) from the string `text`, with a clear error if unknown."""
    path = ALIASES.get(path, path)
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise ValueError(f"unknown config field {path!r} (no section {part!r})")
        node = node[part]
    if leaf not in node:
        raise ValueError(
            f"unknown config field {path!r}; fields of that section: {', '.join(sorted(node))}; "
            f"aliases: {', '.join(sorted(ALIASES))}"
        )
    try:
        node[leaf] = parse_value(text, node[leaf])
    except ValueError as err:
        raise ValueError(f"bad value for {path}: {err}") from None


def apply_updates(config: ml_collections.ConfigDict, updates: Mapping[str, Any]) -> None:
    """Sets dotted paths to already-typed values (presets)."""
    for path, value in updates.items():
        *parents, leaf = path.split(".")
        node = config
        for part in parents:
            node = node[part]
        if leaf not in node:
            raise ValueError(f"preset sets unknown config field {path!r}")
        node[leaf] = value


def build(
    config: ml_collections.ConfigDict,
    presets: Mapping[str, Mapping[str, Any]],
    arg: str | None,
    default_preset: str = "default",
) -> ml_collections.ConfigDict:
    """Applies the preset named first in `arg` (or `default_preset`), then its key=value pairs."""
    parts = [p.strip() for p in (arg or "").split(",") if p.strip()]
    preset = default_preset
    if parts and "=" not in parts[0]:
        preset = parts.pop(0)
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; accepted: {', '.join(presets)}")
    apply_updates(config, presets[preset])
    config.preset = preset
    for part in parts:
        if "=" not in part:
            raise ValueError(f"config argument {part!r} is not key=value (e.g. layers=48)")
        key, value = part.split("=", 1)
        set_path(config, key.strip(), value.strip())
    return config
