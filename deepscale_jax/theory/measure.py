"""Moment types, sampling, estimation and the error metric of the signal-propagation checks.

Conventions (Kedia et al. 2024, sec. 2; shared/reference/theory.md sec. 1): a signal x of shape
(..., L tokens, d features) has per-element mean mu, variance s^2, and inter-token correlation r:
the covariance of the same feature at two different tokens is r s^2. Features (and independent
runs) are i.i.d. samples. A gradient g = dLoss/dx has variance and inter-token correlation too.

Measured statistics are named as the authors print them:
  "x mean", "x var", "x cov" (forward output), "g var", "g cov" (input gradient);
"x cov"/"g cov" are inter-token *covariances* (r s^2), as in the authors' scripts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

STATISTICS: tuple[str, ...] = ("x mean", "x var", "x cov", "g var", "g cov")

# The authors' 50/90/99th-percentile errors in % (theory.md sec. 3.2, their
# `simulations/expected_output.txt`): the targets of every component sweep.
AUTHORS_PERCENTILES: dict[str, dict[str, tuple[float, float, float]]] = {
    "FFN": {
        "x mean": (0.0, 0.4, 1.3),
        "x var": (0.4, 1.4, 2.8),
        "g var": (0.2, 1.0, 2.2),
        "x cov": (0.4, 1.4, 2.8),
        "g cov": (0.2, 1.0, 2.2),
    },
    "ReLU": {
        "x mean": (0.3, 1.3, 2.3),
        "x var": (0.5, 1.9, 3.4),
        "g var": (0.6, 1.5, 2.6),
        "x cov": (0.3, 1.6, 3.1),
        "g cov": (0.2, 1.1, 2.3),
    },
    "GeLU": {
        "x mean": (0.1, 1.0, 2.4),
        "x var": (0.2, 0.6, 1.3),
        "g var": (0.2, 0.6, 1.1),
        "x cov": (0.1, 0.5, 1.2),
        "g cov": (0.1, 0.4, 0.9),
    },
    "LayerNorm": {
        "x mean": (1.4e-05, 9.3e-05, 1.4e-04),
        "x var": (0.0, 0.0, 0.0),
        "g var": (0.4, 1.5, 3.2),
        "x cov": (0.1, 0.5, 1.0),  # the authors' "x covl" (inter-token)
        "x covd": (0.0, 0.0, 0.0),  # inter-feature, same token
        "g cov": (0.2, 0.9, 2.2),
    },
    "Dropout": {
        "x mean": (0.0, 0.1, 0.5),
        "x var": (0.1, 0.5, 1.5),
        "g var": (0.1, 0.7, 1.5),
        "x cov": (0.0, 0.4, 1.3),
        "g cov": (0.1, 0.5, 1.2),
    },
    "Softmax": {
        "x mean": (0.0, 0.0, 0.0),
        "x var full": (0.2, 0.9, 4.0),
        "x var approx": (0.1, 0.5, 2.6),
        "g var full": (0.1, 0.6, 4.5),
        "g var approx": (0.1, 0.6, 3.7),
    },
    "SHA": {
        "x mean": (0.2, 1.0, 2.5),
        "x var": (1.4, 4.1, 7.8),
        "g var": (2.2, 13.3, 44.5),
        "x cov": (1.3, 3.9, 7.4),
        "g cov": (1.6, 4.5, 8.2),
    },
}


@dataclasses.dataclass(frozen=True)
class Signal:
    """Forward moments: per-element mean, variance, inter-token correlation."""

    mean: float = 0.0
    var: float = 1.0
    corr: float = 0.0

    @property
    def cov(self) -> float:
        return self.corr * self.var

    @property
    def second_moment(self) -> float:
        return self.var + self.mean**2


@dataclasses.dataclass(frozen=True)
class Grad:
    """Backward moments of dLoss/dx: variance and inter-token correlation (mean is 0)."""

    var: float = 1.0
    corr: float = 0.0

    @property
    def cov(self) -> float:
        return self.corr * self.var


def stats_of(x: Signal, g: Grad) -> dict[str, float]:
    """The five printed statistics of an output signal and an input gradient."""
    return {"x mean": x.mean, "x var": x.var, "x cov": x.cov, "g var": g.var, "g cov": g.cov}


def sample_equicorrelated(
    key: jax.Array, shape: tuple[int, ...], signal: Signal | Grad, token_axis: int = -2
) -> jax.Array:
    """Gaussian samples with the given mean, variance and inter-token correlation.

    x = mu + s (sqrt(r) z_shared + sqrt(1 - r) z_token), z_shared shared along `token_axis`:
    Cov(x_i, x_j) = r s^2 for tokens i != j; independent across every other axis.
    """
    mean = getattr(signal, "mean", 0.0)
    corr = float(signal.corr)
    if not 0.0 <= corr <= 1.0:
        raise ValueError(f"inter-token correlation {corr} must lie in [0, 1]")
    k_shared, k_token = jax.random.split(key)
    shared_shape = list(shape)
    shared_shape[token_axis] = 1
    z_shared = jax.random.normal(k_shared, tuple(shared_shape))
    z_token = jax.random.normal(k_token, shape)
    z = math.sqrt(corr) * z_shared + math.sqrt(1.0 - corr) * z_token
    return mean + math.sqrt(signal.var) * z


def estimate(y: jax.Array, token_axis: int = -2) -> tuple[float, float, float]:
    """(mean, variance, mean off-diagonal inter-token covariance) of samples y.

    Every axis but `token_axis` indexes i.i.d. samples. The covariance matrix over tokens is
    estimated around per-token means (as `torch.cov` in the authors' scripts), and its
    off-diagonal mean is computed without forming it:
    sum_{i != j} C_ij = Var(sum_i y_i) - sum_i Var(y_i).
    """
    y = jnp.moveaxis(jnp.asarray(y, jnp.float32), token_axis, -1)
    length = y.shape[-1]
    samples = y.reshape(-1, length)
    n = samples.shape[0]
    mean = float(jnp.mean(samples))
    var = float(jnp.var(samples))
    centred = samples - jnp.mean(samples, axis=0, keepdims=True)
    total = float(jnp.sum(jnp.square(jnp.sum(centred, axis=1)))) / (n - 1)
    diag = float(jnp.sum(jnp.square(centred))) / (n - 1)
    cov = (total - diag) / (length * (length - 1))
    return mean, var, cov


def token_covariance(y: jax.Array, token_axis: int = -2) -> np.ndarray:
    """(L, L) covariance matrix over tokens, every other axis indexing i.i.d. samples, around
    per-token means: the full matrix whose mean off-diagonal entry `estimate` returns."""
    y = jnp.moveaxis(jnp.asarray(y, jnp.float32), token_axis, -1)
    samples = y.reshape(-1, y.shape[-1])
    centred = samples - jnp.mean(samples, axis=0, keepdims=True)
    return np.asarray(centred.T @ centred) / (samples.shape[0] - 1)


def cross_sequence_covariance(y: jax.Array) -> np.ndarray:
    """(T, T) covariance of y (B, T, d) between tokens of *different* sequences, per feature,
    averaged over the B (B - 1) ordered pairs of sequences, around the same per-token means as
    `token_covariance`. At initialization all sequences pass through the same weights, so a
    shared component (the collapse direction, the gradient of the average prediction) makes
    this as large as the within-sequence covariance."""
    y = jnp.asarray(y, jnp.float32)
    batch, _, d = y.shape
    y = y - jnp.mean(y, axis=(0, 2), keepdims=True)
    total = jnp.einsum("btf,csf->ts", y, y)
    same = jnp.einsum("btf,bsf->ts", y, y)
    return np.asarray(total - same) / (batch * (batch - 1) * d)


def measure(
    fn: Callable[[jax.Array], jax.Array],
    key: jax.Array,
    input_shape: tuple[int, ...],
    x: Signal,
    g: Grad,
    token_axis: int = -2,
) -> dict[str, float]:
    """Runs `fn` (built from the real modules) forward and backward on sampled moments.

    Draws an input with moments `x` and an output gradient with moments `g` (equicorrelated
    over tokens), computes y = fn(input) and the input gradient with `jax.vjp`, and returns the
    measured statistics named as in STATISTICS.
    """
    k_x, k_g = jax.random.split(key)
    inputs = sample_equicorrelated(k_x, input_shape, x, token_axis)
    y, vjp = jax.vjp(fn, inputs)
    cotangent = sample_equicorrelated(k_g, y.shape, g, token_axis)
    (g_in,) = vjp(cotangent.astype(y.dtype))
    y_mean, y_var, y_cov = estimate(y, token_axis)
    _, g_var, g_cov = estimate(g_in, token_axis)
    return {"x mean": y_mean, "x var": y_var, "x cov": y_cov, "g var": g_var, "g cov": g_cov}


def authors_error(actual: float, predicted: float, scale: float | None = None) -> float:
    """The error metric of Kedia et al.'s `calc_err` (theory.md sec. 3.1).

    Variances (scale None): |actual - predicted| / |actual|. Means and covariances (scale = the
    predicted variance): min(relative error, |actual - predicted| / scale), or, when predicted is
    0, min(|actual|, |actual| / scale). So a covariance counts as right when its absolute error
    is small next to the variance.
    """
    diff = abs(actual - predicted)
    if scale is None:
        return diff / abs(actual) if actual != 0 else (0.0 if diff == 0 else math.inf)
    if predicted == 0:
        return min(abs(actual), abs(actual) / scale)
    relative = diff / abs(actual) if actual != 0 else math.inf
    return min(relative, diff / scale)


def case_errors(
    measured: Mapping[str, float],
    predicted: Mapping[str, float],
    plain_relative: Iterable[str] = (),
) -> dict[str, float]:
    """Authors' error for each statistic present in `predicted`.

    Means and covariances are scaled by the predicted variance of the same quantity ("x var" for
    "x mean"/"x cov", "g var" for "g cov"); statistics in `plain_relative` use the plain relative
    error (the authors do so for softmax and for the attention "g cov").
    """
    plain = set(plain_relative)
    errors = {}
    for name, value in predicted.items():
        scale = None
        if name not in plain and name in ("x mean", "x cov", "g cov"):
            scale = predicted.get("g var" if name == "g cov" else "x var")
        errors[name] = authors_error(measured[name], value, scale)
    return errors


class Case(Protocol):
    """One configuration of one component in a sweep."""

    component: str
    params: Mapping[str, float]

    def predict(self) -> dict[str, float]: ...

    def measure(self, key: jax.Array) -> dict[str, float]: ...


def percentiles(errors: Iterable[float], qs: tuple[int, ...] = (50, 90, 99)) -> tuple[float, ...]:
    """Percentiles in percent, computed as the authors do: sorted(errs)[int(n q / 100)] * 100."""
    ordered = np.sort(np.asarray(list(errors), np.float64))
    n = len(ordered)
    return tuple(float(ordered[min(int(n * q / 100), n - 1)] * 100) for q in qs)
