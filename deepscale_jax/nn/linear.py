"""Dense projections with an explicit initializer and logical axis names."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepscale_jax.nn.initializers import Initializer, zeros


class Dense(nn.Module):
    """y = x W + b over the last `len(in_axes_names)` axes of x.

    The kernel has shape `in_shape + features`; `axes` names every kernel axis for sharding
    (e.g. ("embed", "heads", "kv")). There is no default initializer: callers pass the scheme's.
    """

    features: tuple[int, ...]
    kernel_init: Initializer
    axes: tuple[str, ...]
    num_in_axes: int = 1
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[x.ndim - self.num_in_axes :]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.axes),
            (*in_shape, *self.features),
            jnp.float32,
        )
        y = jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), self.num_in_axes)
        if self.use_bias:
            bias = self.param(
                "bias",
                nn.with_logical_partitioning(zeros, self.axes[self.num_in_axes :]),
                self.features,
                jnp.float32,
            )
            y = y + bias.astype(self.dtype)
        return y


def as_tuple(features: int | Sequence[int]) -> tuple[int, ...]:
    return (features,) if isinstance(features, int) else tuple(features)
