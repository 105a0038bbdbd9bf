"""Losses, evaluation metrics and metric writers (JSONL + TensorBoard), process 0 only.

- Token cross-entropy in nats, averaged over tokens with weight 1 (padding has weight 0).
- Bits per token = nats / ln 2; for byte-level tokens this is bits per byte (bpb); a uniform byte
  model scores log2(256) = 8 bpb.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax


def token_cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted per-token cross-entropy in nats, sum of weights)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if weights is None:
        weights = jnp.ones_like(losses)
    return jnp.sum(losses * weights), jnp.sum(weights)


def nats_to_bits(nats: float) -> float:
    return nats / math.log(2.0)


class MetricWriter:
    """Writes scalars to `workdir/metrics.jsonl` (one object per step) and TensorBoard events.

    Only process 0 writes; other processes get a writer that does nothing.
    """

    def __init__(self, workdir: str, enabled: bool | None = None) -> None:
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in record.items():
            if name != "step":
                self._tb.add_scalar(name, value, int(step))

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """All records of `workdir/metrics.jsonl`, in order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_metrics(workdir: str, last_step: int) -> int:
    """Drops the metrics.jsonl records after `last_step` (written by a run killed after its last
    checkpoint, which the resumed run writes again) and any unreadable line (a write cut
    short); returns how many records were dropped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) < len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
    return len(lines) - len(kept)
