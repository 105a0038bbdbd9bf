"""The task interface: everything the training loop needs to know about one kind of problem.

A task (registered by `config.task` in tasks/__init__.py) gives
- `model`: the Flax module, built through the models registry from `config.model` + scheme;
- `init_inputs()`: example inputs (batch 1) that `model.init` traces to create the parameters;
- `iterator(split, training)`: this process's batches of a split (a grain iterator whose
  `get_state`/`set_state` make resume exact); shuffled and endless when training, one
  ordered pass otherwise;
- `loss(params, batch, deterministic, rngs)`: (sum of per-item losses, number of items); the
  train step minimises sum / count;
- `eval_stats(params, batch)`: a dict of sums over one batch (jitted); the loop adds them up over
  an evaluation pass and `eval_metrics(totals)` turns the totals into the reported metrics
  (written as `eval/<split>/<name>`);
- `unit` / `units_per_step()`: what the throughput counts (`perf/<unit>_per_sec`);
- `token_sample()`: a batch of training tokens, for schemes that measure the data
  (`scheme.needs_token_sample`); text tasks only.
`validate(config, model)` (a classmethod) checks the task's own config fields, early, with
messages that name the field.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.schemes.base import Scheme

Batch = dict[str, Any]


class Task(abc.ABC):
    name: ClassVar[str]
    unit: ClassVar[str] = "tokens"
    default_eval_splits: ClassVar[tuple[str, ...]] = ("validation",)

    def __init__(
        self, config: ml_collections.ConfigDict, model: ModelConfig, scheme: Scheme
    ) -> None:
        self.config = config
        if scheme.needs_token_sample:  # e.g. DeepScaleLM with r0 measured from the data
            scheme = scheme.with_token_sample(self.token_sample())
        self.model = self.build_model(model, scheme)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """`data.eval_splits` if the config sets it, else the task's default."""
        return tuple(self.config.data.get("eval_splits") or self.default_eval_splits)

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict, model: ModelConfig) -> None:
        """Raises ValueError naming the first bad task-specific field."""
        del config, model  # no task-specific fields by default

    @abc.abstractmethod
    def build_model(self, model: ModelConfig, scheme: Scheme) -> nn.Module: ...

    def token_sample(self) -> np.ndarray:
        """(B, T) int tokens of the training data, for schemes that read its statistics."""
        raise ValueError(
            f"task {self.name!r} has no token data for a scheme that measures it "
            "(e.g. scheme.r0_from_data=True); set that option off"
        )

    @abc.abstractmethod
    def init_inputs(self) -> tuple[jax.Array, ...]: ...

    @abc.abstractmethod
    def iterator(self, split: str, training: bool) -> Any: ...

    @abc.abstractmethod
    def loss(
        self, params: Any, batch: Batch, deterministic: bool, rngs: dict | None = None
    ) -> tuple[jax.Array, jax.Array]: ...

    @abc.abstractmethod
    def eval_stats(self, params: Any, batch: Batch) -> dict[str, jax.Array]: ...

    @abc.abstractmethod
    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]: ...

    @abc.abstractmethod
    def units_per_step(self) -> int: ...


def check_seq_len(config: ml_collections.ConfigDict, model: ModelConfig) -> None:
    """train.seq_len (a positive integer: `validation.validate_config`) is set and fits the
    position table."""
    seq_len = config.train.get("seq_len")
    if seq_len is None:
        raise ValueError(f"task={config.task!r} needs train.seq_len (tokens per row)")
    if seq_len > model.max_len:
        raise ValueError(
            f"train.seq_len={seq_len} is longer than the position table "
            f"model.max_len={model.max_len}"
        )
