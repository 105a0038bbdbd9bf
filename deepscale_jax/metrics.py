"""Losses, evaluation metrics and metric writers (JSONL + TensorBoard), process 0 only.

- Token cross-entropy in nats, averaged over tokens with weight 1 (padding has weight 0).
- Bits per token = nats / ln 2; for byte-level tokens this is bits per byte (bpb); a uniform byte
  model scores log2(256) = 8 bpb.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepscale_jax import flops


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


LAYER_NORMS = "layer_grad_norm/"  # per-step metrics holding (num_layers,) vectors (spikes.py)


@dataclasses.dataclass(frozen=True)
class LayerNormStats:
    """One log interval's per-layer gradient norms (`spikes.layer_grad_norms`): at the step
    with the largest loss, and averaged over the interval's applied steps."""

    loss_max: float
    at_max: dict[str, np.ndarray]
    mean: dict[str, np.ndarray]


class IntervalMeter:
    """Sums per-step metrics on the device and fetches them once per log interval, adding
    throughput (time spent in evaluation is excluded by `restart_clock`).

    With a `train/skipped` metric (1.0 on a skipped step), the metrics in `APPLIED_MEANS` are
    averaged over the interval's applied steps only (NaN if every step was skipped) and
    `train/skipped` itself is not reported (the loop logs the total, `train/skipped_steps`).

    Per-layer vectors (`LAYER_NORMS` + stack) are not reported as scalars: `flush` returns them
    as `LayerNormStats` for spike detection. With `flops_per_step` (flops.py) and the peak
    FLOP/s of one device, `perf/tflops_per_sec_per_device` and `perf/mfu` are added
    (`flops.perf_metrics`)."""

    APPLIED_MEANS = ("train/loss", "train/grad_norm")

    def __init__(
        self,
        units_per_step: int,
        unit: str = "tokens",
        flops_per_step: float | None = None,
        num_devices: int = 1,
        peak_flops_per_device: float | None = None,
    ) -> None:
        self.units_per_step = units_per_step
        self.unit = unit
        self.flops_per_step = flops_per_step
        self.num_devices = num_devices
        self.peak_flops_per_device = peak_flops_per_device
        self._sums: dict | None = None
        self._max: tuple[jax.Array, dict] | None = None  # (largest loss, layer norms there)
        self._steps = 0
        self._start = time.perf_counter()

    @property
    def steps(self) -> int:
        """Steps added since the last flush."""
        return self._steps

    def add(self, metrics: dict) -> None:
        self._sums = metrics if self._sums is None else jax.tree.map(jnp.add, self._sums, metrics)
        layers = {k: v for k, v in metrics.items() if k.startswith(LAYER_NORMS)}
        if layers:
            loss = metrics["train/loss"]
            if self._max is None:
                self._max = (loss, layers)
            else:
                worse = loss > self._max[0]
                self._max = (
                    jnp.maximum(loss, self._max[0]),
                    jax.tree.map(lambda n, o: jnp.where(worse, n, o), layers, self._max[1]),
                )
        self._steps += 1

    def restart_clock(self) -> None:
        self._start = time.perf_counter()

    def detach(self, extra: Any = None) -> PendingInterval:
        """Ends the interval: its device values (and `extra`, device arrays to fetch with them)
        start copying to the host and the meter starts the next interval; the returned handle's
        `result()` waits for the copy. Taken at a log step and resolved after the next step is
        dispatched, the host never idles the device."""
        pending = PendingInterval(self, self._sums, self._max, self._steps, self._start, extra)
        self._sums, self._max, self._steps = None, None, 0
        return pending

    def flush(self, extra: Any = None) -> tuple[dict[str, float], LayerNormStats | None, Any]:
        """`detach(extra).result()`: the interval's scalars, per-layer norm statistics (or
        None) and `extra` on the host."""
        return self.detach(extra).result()

    def _scalars(self, sums: dict, steps: int, elapsed: float) -> tuple[dict, dict, float]:
        """(scalars, per-layer vectors, applied steps) of one interval's host sums."""
        applied = steps - float(sums.pop("train/skipped", 0.0))
        vectors = {
            k[len(LAYER_NORMS) :]: sums.pop(k) for k in list(sums) if k.startswith(LAYER_NORMS)
        }
        scalars = {}
        for name, total in sums.items():
            if name in self.APPLIED_MEANS:
                scalars[name] = float(total) / applied if applied else float("nan")
            else:
                scalars[name] = float(total) / steps
        step_seconds = elapsed / steps
        scalars[f"perf/{self.unit}_per_sec"] = self.units_per_step / step_seconds
        scalars["perf/step_seconds"] = step_seconds
        if self.flops_per_step and self.peak_flops_per_device:
            scalars.update(
                flops.perf_metrics(
                    self.flops_per_step,
                    step_seconds,
                    self.num_devices,
                    self.peak_flops_per_device,
                )
            )
        return scalars, vectors, applied


class PendingInterval:
    """A detached interval of an `IntervalMeter` whose values are on their way to the host."""

    def __init__(self, meter: IntervalMeter, sums, peak, steps: int, start: float, extra) -> None:
        self._meter, self._steps, self._start = meter, steps, start
        self._values = (sums, peak, extra)
        for leaf in jax.tree.leaves(self._values):
            if isinstance(leaf, jax.Array):
                leaf.copy_to_host_async()

    def result(self) -> tuple[dict[str, float], LayerNormStats | None, Any]:
        """Waits for the interval's last step; (scalars, per-layer statistics or None, extra).
        The interval's clock stops here and the meter's next interval starts timing."""
        sums, peak, extra = jax.device_get(self._values)
        elapsed = time.perf_counter() - self._start
        self._meter.restart_clock()
        scalars, vectors, applied = self._meter._scalars(dict(sums), self._steps, elapsed)
        stats = None
        if peak is not None:
            mean = {k: v / max(applied, 1.0) for k, v in vectors.items()}
            at_max = {k[len(LAYER_NORMS) :]: v for k, v in peak[1].items()}
            stats = LayerNormStats(float(peak[0]), at_max, mean)
        return scalars, stats, extra
