"""Initializers and the layout-independent keying of per-layer weights.

A weight inside layer `l` is drawn with the key `fold_in(fold_in(stack_key, l), crc32(role))`,
not with the key Flax derives from the module path. The initial value of every layer weight is
therefore a pure function of (seed, layer index, role): a scanned stack (params stacked on a
leading `layers` axis) and an unrolled stack (one module per layer) get identical parameters,
and a deeper model shares its lower layers with a shallower one of the same seed.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]
Std = float | jax.Array


def normal(std: Std) -> Initializer:
    """N(0, std^2); `std` may be a traced value (layer-dependent schemes under `nn.scan`)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

    return init


def constant(value: float) -> Initializer:
    """A constant fill (norm gains 1, biases 0): deterministic, so no key is used."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        del key
        return jnp.full(shape, value, dtype)

    return init


zeros = constant(0.0)
ones = constant(1.0)


def role_key(layer_key: jax.Array, role: str) -> jax.Array:
    """The key of the weight with `role` in the layer whose key is `layer_key`."""
    return jax.random.fold_in(layer_key, zlib.crc32(role.encode()) & 0x7FFFFFFF)


def with_key(init: Initializer, key: jax.Array) -> Initializer:
    """`init` drawing from `key` instead of the key Flax hands to the initializer."""

    def keyed(_flax_key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32):
        return init(key, shape, dtype)

    return keyed


@dataclasses.dataclass(frozen=True)
class LayerInit:
    """Where a weight sits: the scheme, the layer index (int or traced) and the layer's key.

    `for_role(role)` is the initializer a module passes to `self.param`. Outside a layer stack
    (embeddings, output head) `index` and `key` are None and Flax's own key is used.
    """

    scheme: Any
    index: jax.Array | int | None = None
    key: jax.Array | None = None

    def for_role(self, role: str) -> Initializer:
        init = self.scheme.init(role, self.index)
        if self.key is None:
            return init
        return with_key(init, role_key(self.key, role))

    def for_roles(self, roles: tuple[str, ...], axis: int) -> Initializer:
        """One kernel holding the weights of several roles along `axis` (a fused projection):
        slice i is drawn exactly as `for_role(roles[i])` draws the separate weight, so a fused
        layer starts from the same numbers as the unfused one. Outside a stack (no layer key)
        slice i uses `role_key` of Flax's key."""
        inits = [self.for_role(role) for role in roles]

        def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
            if shape[axis] != len(roles):
                raise ValueError(f"axis {axis} of {shape} should hold the {len(roles)} {roles}")
            part = shape[:axis] + shape[axis + 1 :]
            slices = [fn(role_key(key, r), part, dtype) for fn, r in zip(inits, roles, strict=True)]
            return jnp.stack(slices, axis)

        return init
