"""Normalisation layers behind a registry by name (`model.norm`).

- layer_norm: (x - mean) / sqrt(var + eps) * g + b, over the feature axis (Ba et al. 2016).
- rms_norm:   x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019, eq. 4; TF reference eps
  placement inside the square root).
- prms_norm:  partial RMSNorm (Zhang & Sennrich 2019, "pRMSNorm"; variants.md sec. 3): the same
  map with the RMS estimated from the first k = ceil(p n) of the n features only,
  x / sqrt((1/k) sum_{i<=k} x_i^2 + eps) * g, applied to all n features; p =
  `model.norm_partial_fraction` (the paper's 6.25% by default).
- scale_norm: ScaleNorm (Nguyen & Salazar 2019, "ScaleNorm"): g * x / max(||x||_2, eps) with
  ONE learned scalar g per norm site, initialised to sqrt(d), and the norm clamped at eps as in
  their code (tnq177/transformers_without_tears, layers.py `ScaleNorm`). At init it equals
  rms_norm without eps (g x/||x|| = (g/sqrt(d)) x/RMS(x)).
- none:       the identity, no parameters: for the schemes that train without normalisation
  (T-Fixup, Huang et al. 2020; ReZero, Bachlechner et al. 2020). With it, Pre-LN and Post-LN
  placements compute the same thing and the LM's final norm is the identity.
Statistics are computed in float32 whatever the compute dtype. Gains start at 1 (ScaleNorm's at
sqrt(d)), biases at 0. Build a model's norm with `norm_from_config(cfg, name)`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepscale_jax.nn.initializers import constant, ones, zeros

if TYPE_CHECKING:
    from deepscale_jax.model_config import ModelConfig

DEFAULT_PARTIAL_FRACTION = 0.0625  # pRMSNorm's p = 6.25% in Zhang & Sennrich (2019)


class LayerNorm(nn.Module):
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        gain = self.param("scale", nn.with_logical_partitioning(ones, ("norm",)), (d,))
        bias = self.param("bias", nn.with_logical_partitioning(zeros, ("norm",)), (d,))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * gain + bias
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean_{i<=n} x_i^2 + eps) * g, gain g (n,) init ones, no bias (Zhang &
    Sennrich 2019, eq. 4; eps inside the square root as in their TF reference `rsqrt(ms + eps)`).
    """

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        gain = self.param("scale", nn.with_logical_partitioning(ones, ("norm",)), (d,))
        x32 = x.astype(jnp.float32)
        ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(ms + self.eps) * gain).astype(self.dtype)


def partial_features(n: int, fraction: float) -> int:
    """k = ceil(p n), clipped to [1, n]: the features pRMSNorm takes its statistic from.

    The paper writes k = ceil(n p) (Zhang & Sennrich 2019); their code takes int(n p),
    the floor. The two agree whenever p n is an integer (n = 512, p = 6.25%: k = 32). p n is
    rounded to 9 decimals first, so that float error (0.1 * 30 = 3.0000000000000004) does not
    push an integer product up by one.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"model.norm_partial_fraction={fraction!r} must lie in (0, 1]")
    return min(n, max(1, math.ceil(round(fraction * n, 9))))


class PartialRMSNorm(nn.Module):
    """pRMSNorm (Zhang & Sennrich 2019): y = x / sqrt((1/k) sum_{i<=k} x_i^2 + eps) * g.

    The RMS comes from the first k = `partial_features(n, partial_fraction)` features only and
    normalises all n of them; gain g (n,) init ones, no bias, eps inside the square root as in
    `RMSNorm`. With p = 1 (k = n) it is `RMSNorm`.
    """

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    partial_fraction: float = DEFAULT_PARTIAL_FRACTION

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        k = partial_features(d, self.partial_fraction)
        gain = self.param("scale", nn.with_logical_partitioning(ones, ("norm",)), (d,))
        x32 = x.astype(jnp.float32)
        ms = jnp.mean(jnp.square(x32[..., :k]), axis=-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(ms + self.eps) * gain).astype(self.dtype)


class ScaleNorm(nn.Module):
    """ScaleNorm (Nguyen & Salazar 2019): y = g x / max(||x||_2, eps).

    g is one learned scalar per norm site (param "scale", shape ()), initialised to sqrt(d) as in
    the paper (variants.md sec. 2; a community port's g = 1 differs), so at init y has norm
    sqrt(d), i.e. unit RMS, like the other norms. The clamp max(||x||, eps), with eps =
    `model.norm_eps` (1e-5 by default, the reference code's value), is the reference's
    `torch.norm(x, dim=-1).clamp(min=eps)`. Under `nn.scan` the scalar becomes a (layers,) vector.
    """

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        g = self.param("scale", nn.with_logical_partitioning(constant(math.sqrt(d)), ()), ())
        x32 = x.astype(jnp.float32)
        # max(||x||, eps) = sqrt(max(||x||^2, eps^2)): the same value, and a zero row gets a zero
        # gradient instead of sqrt'(0) = inf times 0 = NaN.
        sq = jnp.sum(jnp.square(x32), axis=-1, keepdims=True)
        return (x32 * (g * jax.lax.rsqrt(jnp.maximum(sq, self.eps**2)))).astype(self.dtype)


class Identity(nn.Module):
    """No normalisation: y = x (cast to the compute dtype). `eps` is accepted and unused."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.astype(self.dtype)


NORMS: dict[str, type[nn.Module]] = {
    "layer_norm": LayerNorm,
    "rms_norm": RMSNorm,
    "prms_norm": PartialRMSNorm,
    "scale_norm": ScaleNorm,
    "none": Identity,
}


def make_norm(
    name: str,
    eps: float,
    dtype: jnp.dtype,
    module_name: str | None,
    *,
    partial_fraction: float = DEFAULT_PARTIAL_FRACTION,
) -> nn.Module:
    """The norm registered as `name` (ValueError listing the registry if unknown).

    `partial_fraction` (pRMSNorm's p) reaches only the norms that have one ("prms_norm").
    Models should call `norm_from_config`, which passes every norm field of the config.
    """
    if name not in NORMS:
        raise ValueError(f"unknown model.norm={name!r}; accepted: {', '.join(NORMS)}")
    cls = NORMS[name]
    extra = {}
    if "partial_fraction" in cls.__dataclass_fields__:
        extra["partial_fraction"] = partial_fraction
    return cls(eps=eps, dtype=dtype, name=module_name, **extra)


def norm_from_config(cfg: ModelConfig, module_name: str | None) -> nn.Module:
    """The model's norm: `model.norm` with `norm_eps`, `dtype`, `norm_partial_fraction`."""
    return make_norm(
        cfg.norm,
        cfg.norm_eps,
        jnp.dtype(cfg.dtype),
        module_name,
        partial_fraction=cfg.norm_partial_fraction,
    )
