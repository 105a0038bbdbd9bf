"""Validate a whole experiment config once, early, with messages that name the field.

Each section is checked where its fields live: `model` by `ModelConfig.validate`, `scheme` by
the scheme (here only the option types, against every scheme's defaults), `optim` by
`optim.validate_optim`, the task's own fields (`data`, `seq2seq`, `vit`) by `Task.validate`,
and `train`, `mesh`, `ckpt` here. Every message is one line: `section.field=value` and what
would be accepted.

The field checks at the top (`check_int`, `check_number`, `check_bool`, `check_choice`,
`check_optional_str`) are shared by those owners; this module imports the owners only inside
`validate_config`, so they can import the checks without an import cycle.
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import ml_collections

if TYPE_CHECKING:
    from deepscale_jax.model_config import ModelConfig
    from deepscale_jax.schemes import Scheme

SECTIONS = ("model", "scheme", "data", "optim", "train", "mesh", "ckpt")

# ---------------------------------------------------------------------------- field checks


def is_int(value: Any) -> bool:
    """An int that is not a bool (True is an int in Python, never a count here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(value: Any, field: str, minimum: int = 1, also: tuple[int, ...] = ()) -> int:
    """`value` if it is an integer >= `minimum` (or one of `also`, e.g. -1 = auto)."""
    if is_int(value) and (value >= minimum or value in also):
        return value
    if minimum == 1 and not also:
        raise ValueError(f"{field}={value!r} must be a positive integer")
    extra = "".join(f" or {a}" for a in also)
    raise ValueError(f"{field}={value!r} must be an integer >= {minimum}{extra}")


def check_number(
    value: Any,
    field: str,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` if it is a finite number in the interval from `low` to `high` (open ends as
    flagged; None = unbounded)."""
    ok = is_number(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if ok:
        return value
    raise ValueError(f"{field}={value!r} must {_accepted(low, high, low_open, high_open)}")


def _accepted(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """'lie in [0, 1)', 'be positive', 'be >= 0', ... for `check_number`'s message."""
    if low is not None and high is not None:
        return f"lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        if low == 0 and low_open:
            return "be positive"
        return f"be {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"be {'<' if high_open else '<='} {high:g}"
    return "be a finite number"


def check_bool(value: Any, field: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{field}={value!r} must be True or False")
    return value


def check_choice(value: Any, field: str, accepted: Collection[str]) -> str:
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"unknown {field}={value!r}; accepted: {', '.join(accepted)}")
    return value


def check_optional_str(value: Any, field: str, what: str = "a path") -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"{field}={value!r} must be {what} (a non-empty string) or None")
    return value


# ------------------------------------------------------------------------- whole config


def _check_train(train: ml_collections.ConfigDict) -> None:
    for name in ("num_steps", "batch_size", "log_every_steps", "eval_every_steps"):
        check_int(train.get(name), f"train.{name}")
    check_int(train.get("max_bad_steps"), "train.max_bad_steps")
    if "seq_len" in train:  # the image task has none; text tasks check it against max_len
        check_int(train.seq_len, "train.seq_len")
    check_int(train.get("seed"), "train.seed", minimum=0)
    check_int(train.get("prefetch_batches", 0), "train.prefetch_batches", minimum=0)
    spike_factor = train.get("spike_factor", 0.0)
    if not (spike_factor == 0 or check_number(spike_factor, "train.spike_factor") > 1):
        raise ValueError(
            f"train.spike_factor={spike_factor!r} must be 0 (off) or a number > 1 (a loss above "
            "that multiple of its moving average is reported as a spike)"
        )
    value = train.get("eval_batches")
    if not is_int(value) or value == 0 or value < -1:
        raise ValueError(f"train.eval_batches={value!r} must be a positive integer or -1 (all)")


def _check_mesh(mesh: ml_collections.ConfigDict) -> None:
    """mesh.shape: sizes >= 1 or one -1 over the known axes; mesh.rules:
    (logical name, mesh axes) pairs over the known axes."""
    from deepscale_jax import sharding

    shape = mesh.get("shape")
    if isinstance(shape, ml_collections.ConfigDict):
        shape = shape.to_dict()
    if not isinstance(shape, dict):
        raise ValueError(f"mesh.shape={shape!r} must map axes {sharding.MESH_AXES} to sizes")
    for axis, size in shape.items():
        if axis not in sharding.MESH_AXES:
            raise ValueError(f"unknown mesh axis mesh.shape.{axis}; accepted: {sharding.MESH_AXES}")
        check_int(size, f"mesh.shape.{axis}", also=(-1,))
    # Device-independent here; `sharding.make_mesh` fits the sizes to the devices at start.
    sharding.resolve_mesh_shape(shape, math.prod(s for s in shape.values() if s != -1))
    rules = mesh.get("rules")
    if rules is not None:
        if isinstance(rules, (str, bytes)) or not all(
            isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str) for r in rules
        ):
            raise ValueError(
                f"mesh.rules={rules!r} must be a sequence of (logical axis name, mesh axes) "
                "pairs, e.g. (('embed', 'fsdp'), ('mlp', 'tensor'))"
            )
        sharding.logical_rules(rules)


def _check_scheme_option_types(scheme: ml_collections.ConfigDict) -> None:
    """Every scheme option has the type of its default (the chosen scheme checks ranges)."""
    from deepscale_jax.schemes import scheme_option_defaults

    for name, default in scheme_option_defaults().items():
        if name not in scheme:
            continue
        field, value = f"scheme.{name}", scheme[name]
        if isinstance(default, bool):
            check_bool(value, field)
        elif isinstance(default, (int, float)):
            check_number(value, field)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"{field}={value!r} must be a string")


def validate_config(config: ml_collections.ConfigDict) -> tuple[ModelConfig, Scheme]:
    """Checks every section (the task's own fields through `Task.validate`); returns the typed
    model config and the built scheme."""
    # Imported here: these modules import the field checks above.
    from deepscale_jax.model_config import ModelConfig
    from deepscale_jax.optim import validate_optim
    from deepscale_jax.schemes import build_scheme
    from deepscale_jax.tasks import get_task_class

    missing = [s for s in SECTIONS if s not in config]
    if missing:
        raise ValueError(f"config has no section(s) {', '.join(missing)}; needs {SECTIONS}")
    model = ModelConfig.from_mapping(config.model.to_dict())
    _check_scheme_option_types(config.scheme)
    scheme = build_scheme(config.scheme.to_dict(), model)

    if "task" not in config:
        raise ValueError("config has no task (e.g. config.task = 'lm')")
    task = get_task_class(config.task)
    _check_train(config.train)
    validate_optim(config.optim)
    _check_mesh(config.mesh)
    check_int(config.ckpt.get("every_steps"), "ckpt.every_steps")
    check_int(config.ckpt.get("max_to_keep"), "ckpt.max_to_keep")
    check_optional_str(config.data.get("data_dir"), "data.data_dir")
    if "preset" in config and not isinstance(config.preset, str):  # recorded by configs/common
        raise ValueError(f"preset={config.preset!r} must be the name of the preset applied")
    task.validate(config, model)
    return model, scheme


# ---------------------------------------------------------------------------------- workdir


def _write_probe(directory: str) -> OSError | None:
    """None if a file can be created, written and removed in `directory`, else the error."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-probe-") as f:
            f.write(b"x")
            f.flush()
    except OSError as err:
        return err
    return None


def check_workdir(workdir: str) -> str:
    """The absolute workdir. Its parent must exist (we create the workdir, not its parents) and
    the workdir (or, before it exists, its parent) must be writable: checked with `os.access`
    and a real write probe, so a read-only mount or a full disk is named before training."""
    if not workdir:
        raise ValueError("--workdir is required (a directory for checkpoints and metrics)")
    path = os.path.abspath(os.path.expanduser(workdir))
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ValueError(
            f"--workdir={workdir!r}: its parent directory {parent!r} does not exist; "
            "create it first or choose another workdir"
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--workdir={workdir!r}: {path!r} exists and is not a directory")
    target = path if os.path.isdir(path) else parent
    error = None
    if not os.access(target, os.W_OK | os.X_OK):
        error = "permission denied"
    else:
        probe = _write_probe(target)
        if probe is not None:
            reason = "the disk is full" if probe.errno == errno.ENOSPC else probe.strerror
            error = reason or str(probe)
    if error:
        what = "the workdir" if target == path else "its parent directory (to create it)"
        raise ValueError(
            f"--workdir={workdir!r}: {what} {target!r} is not writable ({error}); choose a "
            "writable directory or fix its permissions"
        )
    return path
