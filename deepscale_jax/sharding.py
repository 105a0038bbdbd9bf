"""Device mesh from config and logical-axis rules -> NamedSharding.

The mesh has axes (data, fsdp, tensor); `config.mesh.shape` gives their sizes, one of them may be
-1 (filled with what the device count leaves). Modules name their parameter axes logically
("embed", "heads", "mlp", ...); `config.mesh.rules` maps each logical name to mesh axes (MaxText
style), so the same model shards as pure data parallel, FSDP or tensor parallel by config alone.
The batch axis is split over data x fsdp.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

# Logical parameter axis -> mesh axes. "layers" (the scan axis) is never sharded.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("length", None),
    ("norm", None),
    ("layers", None),
)


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes of (data, fsdp, tensor); at most one -1, filled so the product is `num_devices`."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"unknown mesh axis mesh.shape.{unknown[0]}; accepted: {MESH_AXES}")
    sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
    auto = [i for i, s in enumerate(sizes) if s == -1]
    if len(auto) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(
            f"mesh.shape={dict(zip(MESH_AXES, sizes, strict=True))} must hold positive sizes "
            "and at most one -1"
        )
    known = math.prod(s for s in sizes if s != -1)
    if auto:
        if num_devices % known:
            raise ValueError(
                f"mesh.shape={dict(zip(MESH_AXES, sizes, strict=True))}: the fixed axes "
                f"({known} devices) do not divide the {num_devices} available devices"
            )
        sizes[auto[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh.shape={dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} "
            f"devices but {num_devices} are available; use -1 on one axis to auto-fill"
        )
    return tuple(sizes)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes (GSPMD-style propagation)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_rules(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Rules as a tuple of (logical name, mesh axes) pairs; None gives DEFAULT_RULES."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        name, axes = rule
        flat = axes if isinstance(axes, (tuple, list)) else (axes,)
        for axis in flat:
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(
                    f"mesh.rules maps {name!r} to unknown mesh axis {axis!r}; "
                    f"accepted: {MESH_AXES} or None"
                )
        out.append((name, tuple(axes) if isinstance(axes, list) else axes))
    return tuple(out)


def param_shardings(abstract_boxed: Any, mesh: Mesh, rules: Sequence) -> Any:
    """NamedShardings for a tree of logically-partitioned (boxed) abstract parameters."""
    specs = nn.get_partition_spec(abstract_boxed)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> None:
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if global_batch_size % shards:
        raise ValueError(
            f"train.batch_size={global_batch_size} is not divisible by the {shards} batch "
            f"shards of the mesh (data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']})"
        )
