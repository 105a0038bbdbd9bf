"""Loss-spike detection: which layer's gradient norm jumped when the loss spiked.

Deep transformers that diverge usually show it first as a loss spike driven by a few layers whose
gradients blow up (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
instabilities"; Molybog et al. 2023). With `train.spike_factor = f > 0`:

- every step computes the gradient norm of each layer of each stack (`layer_grad_norms`, inside
  the jitted step; the same numbers for the scanned and the unrolled layouts);
- the interval meter (metrics.IntervalMeter) keeps, on the device, the largest loss of the log
  interval, the per-layer norms at that step, and the interval's mean per-layer norms;
- at each log step `SpikeDetector` compares that largest loss with an exponential moving average
  of the previous intervals' mean losses: if it exceeds `f` times the average, it reports the step
  range and the layer whose norm at the worst step grew most against its own moving average.

Detection only logs (a line and `train/spike_*` metrics); the divergence guard (train.py) is what
acts on non-finite steps. With `spike_factor = 0` (the default) nothing is computed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from deepscale_jax.nn.stack import SCANNED_LAYERS, UNROLLED_LAYER

EMA_DECAY = 0.9  # weight of the history in the moving averages, per log interval


def _keys(path: tuple) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def layer_grad_norms(grads: Any) -> dict[str, jax.Array]:
    """{stack path: (num_layers,) L2 norm of each layer's gradient}, for every layer stack in
    `grads` (a params-shaped tree). A scanned stack's leaves carry the layer on axis 0; an
    unrolled stack's layers are the modules `layer_000`, `layer_001`, ...."""
    scanned: dict[str, jax.Array] = {}
    unrolled: dict[str, dict[int, jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        keys = _keys(path)
        for i, key in enumerate(keys):
            stack = "/".join(keys[:i]) or "model"
            if key == SCANNED_LAYERS:
                per_layer = jnp.sum(jnp.square(leaf.reshape(leaf.shape[0], -1)), axis=1)
                scanned[stack] = scanned.get(stack, 0.0) + per_layer.astype(jnp.float32)
                break
            match = UNROLLED_LAYER.fullmatch(key)
            if match:
                layers = unrolled.setdefault(stack, {})
                index = int(match.group(1))
                layers[index] = layers.get(index, 0.0) + jnp.sum(
                    jnp.square(leaf), dtype=jnp.float32
                )
                break
    norms = {stack: jnp.sqrt(sq) for stack, sq in scanned.items()}
    for stack, layers in unrolled.items():
        norms[stack] = jnp.sqrt(jnp.stack([layers[i] for i in sorted(layers)]))
    return norms


@dataclasses.dataclass(frozen=True)
class Spike:
    """A log interval whose largest loss jumped; `layer` names the stack and layer (0-based)
    whose gradient norm grew most, by `ratio` against its moving average."""

    first_step: int
    last_step: int
    loss: float
    loss_average: float
    stack: str
    layer: int
    norm: float
    norm_average: float

    @property
    def ratio(self) -> float:
        return self.norm / self.norm_average if self.norm_average > 0 else float("inf")

    def message(self) -> str:
        return (
            f"loss spike in steps {self.first_step}..{self.last_step}: loss {self.loss:.4g} vs "
            f"a moving average of {self.loss_average:.4g}; the gradient norm of {self.stack} "
            f"layer {self.layer} jumped most, to {self.norm:.3g} from {self.norm_average:.3g} "
            f"({self.ratio:.1f}x)"
        )

    def metrics(self) -> dict[str, float]:
        return {"train/spike_layer": float(self.layer), "train/spike_norm_ratio": self.ratio}


class SpikeDetector:
    """Host-side state of the detection (moving averages over log intervals)."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self._loss: float | None = None
        self._norms: dict[str, np.ndarray] = {}

    def update(
        self,
        first_step: int,
        last_step: int,
        loss_mean: float,
        loss_max: float,
        norms_at_max: dict[str, np.ndarray],
        norms_mean: dict[str, np.ndarray],
    ) -> Spike | None:
        """Checks one log interval (steps first_step..last_step), then folds its means into the
        moving averages (a spiking interval is not folded in, so a long spike keeps being
        compared against the calm before it). Non-finite losses are left to the divergence
        guard."""
        spike = None
        if (
            self._loss is not None
            and np.isfinite(loss_max)
            and loss_max > self.factor * self._loss
            and self._norms
        ):
            stack, layer, _ = max(
                (
                    (stack, int(i), float(r))
                    for stack, now in norms_at_max.items()
                    if stack in self._norms
                    for i, r in enumerate(now / np.maximum(self._norms[stack], 1e-30))
                ),
                key=lambda t: t[2],
            )
            spike = Spike(
                first_step,
                last_step,
                loss_max,
                self._loss,
                stack,
                layer,
                float(norms_at_max[stack][layer]),
                float(self._norms[stack][layer]),
            )
        if spike is None and np.isfinite(loss_mean):
            self._loss = _ema(self._loss, loss_mean)
            for stack, mean in norms_mean.items():
                if np.all(np.isfinite(mean)):
                    self._norms[stack] = _ema(self._norms.get(stack), np.asarray(mean))
        return spike


def _ema(average: Any, value: Any) -> Any:
    return value if average is None else EMA_DECAY * average + (1.0 - EMA_DECAY) * value
