"""Normalisation layers behind a registry by name (`model.norm`).

- layer_norm: (x - mean) / sqrt(var + eps) * g + b, over the feature axis (Ba et al. 2016).
- rms_norm:   x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019, eq. 4; TF reference eps
  placement inside the square root).
- none:       the identity, no parameters: for the schemes that train without normalisation
  (T-Fixup, Huang et al. 2020; ReZero, Bachlechner et al. 2020). With it, Pre-LN and Post-LN
  placements compute the same thing and the LM's final norm is the identity.
Statistics are computed in float32 whatever the compute dtype. Gains start at 1, biases at 0.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepscale_jax.nn.initializers import ones, zeros


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
    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        gain = self.param("scale", nn.with_logical_partitioning(ones, ("norm",)), (d,))
        x32 = x.astype(jnp.float32)
        ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(ms + self.eps) * gain).astype(self.dtype)


class Identity(nn.Module):
    """No normalisation: y = x (cast to the compute dtype). `eps` is accepted and unused."""

    eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.astype(self.dtype)


NORMS: dict[str, type[nn.Module]] = {"layer_norm": LayerNorm, "rms_norm": RMSNorm, "none": Identity}


def make_norm(name: str, eps: float, dtype: jnp.dtype, module_name: str) -> nn.Module:
    """The norm registered as `name` (ValueError listing the registry if unknown)."""
    if name not in NORMS:
        raise ValueError(f"unknown model.norm={name!r}; accepted: {', '.join(NORMS)}")
    return NORMS[name](eps=eps, dtype=dtype, name=module_name)
