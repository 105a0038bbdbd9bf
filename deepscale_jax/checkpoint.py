"""Orbax CheckpointManager wrapper: save, restore-latest-or-None, with the data iterator state and
a compatibility record.

A checkpoint at step s under `workdir/checkpoints/s/` holds three items:
- `state`: the TrainState pytree (params, optimizer state, step, rng, skipped-step counters),
  restored onto the shardings of an abstract target, so a restore never depends on how it was
  saved (another device count or mesh shape restores: orbax reads each target shard from the
  stored global array);
- `data`: the data iterator state (JSON), so a resumed run sees the batches the uninterrupted
  run would have seen;
- `metadata`: what the run was (JSON, `checkpoint_metadata`): task, scheme and its options, the
  model fields, the scan layout, the mesh and device count, the jax version, and the train, optim
  and data sections for the record.
Saves are asynchronous; `close()` waits for the last one. Orbax writes each step to a temporary
directory and renames it when complete, so an interrupted save never replaces a finished one.
A save that fails to write (a full disk, a read-only or vanished directory) surfaces at the next
`save`, `wait` or `close` as a `CheckpointSaveError` naming the directory, the step and the
cause, and the latest finished checkpoint, which is left as it was.

Before a restore, the stored metadata is compared with the current run's (`check_compatible`):
a field that changes parameter shapes or the computation (`MUST_MATCH_MODEL_FIELDS`, the scan
layout, the scheme and its options, the task) must match, else a ValueError names every
differing field; anything else (mesh, device count, jax version, train/optim/data settings,
dropout, remat, attention backend, compute dtype) may differ and is logged in one line. A
checkpoint saved before metadata existed restores with a warning and no check.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from deepscale_jax import sharding
from deepscale_jax.schemes import SCHEMES, scheme_options

METADATA_VERSION = 1
ITEMS = ("state", "data", "metadata")
# Model fields that change parameter shapes or what the network computes: a checkpoint restores
# only into a model that agrees on all of them (and on `scan_layers`, the parameter layout).
MUST_MATCH_MODEL_FIELDS: tuple[str, ...] = (
    "num_layers",
    "encoder_layers",
    "d_model",
    "num_heads",
    "d_ff",
    "vocab_size",
    "max_len",
    "architecture",
    "norm",
    "norm_placement",
    "norm_eps",
    "norm_partial_fraction",
    "position_embedding",
    "tie_embeddings",
    "use_bias",
    "merged_attention",
    "persistent_memory",
    "use_ffn",
    "memory_tokens",
    "memory_mode",
    "fix_norm",
    "activation",
    "fused_qkv",
    "scan_layers",
)


def _jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples -> lists), so stored and current compare."""
    return json.loads(json.dumps(value))


def _section(config: ml_collections.ConfigDict, name: str) -> dict:
    return config[name].to_dict() if name in config else {}


def checkpoint_metadata(
    config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None
) -> dict[str, Any]:
    """What a checkpoint of a run of `config` on `mesh` records about the run (JSON-able).

    `mesh` is the run's mesh (its axis sizes are stored resolved, so -1 never appears); without
    it, `config.mesh.shape` is resolved against `jax.device_count()`.
    """
    scheme = _section(config, "scheme")
    name = scheme.get("name")
    options = scheme_options(name) if name in SCHEMES else {}
    if mesh is not None:
        mesh_shape = {axis: int(size) for axis, size in mesh.shape.items()}
        devices = int(mesh.size)
    else:
        sizes = sharding.resolve_mesh_shape(config.mesh.shape.to_dict(), jax.device_count())
        mesh_shape = dict(zip(sharding.MESH_AXES, sizes, strict=True))
        devices = jax.device_count()
    return _jsonable(
        {
            "version": METADATA_VERSION,
            "task": config.get("task"),
            "scheme": {"name": name, **{k: scheme[k] for k in options if k in scheme}},
            "model": _section(config, "model"),
            "mesh": {"shape": mesh_shape, "devices": devices, "processes": jax.process_count()},
            "jax_version": jax.__version__,
            "train": _section(config, "train"),
            "optim": _section(config, "optim"),
            "data": _section(config, "data"),
        }
    )


def _flatten(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys for the compared fields: task, scheme.*, model.*, mesh.shape, mesh.devices,
    mesh.processes, jax_version, train.*, optim.*, data.* (leaf values unflattened below them)."""
    flat: dict[str, Any] = {}
    for key, value in metadata.items():
        if key in ("version", "converted_from"):
            continue
        if key in ("scheme", "model", "mesh", "train", "optim", "data") and isinstance(
            value, Mapping
        ):
            for sub, sub_value in value.items():
                flat[f"{key}.{sub}"] = sub_value
        else:
            flat[key] = value
    return flat


def _must_match(key: str) -> bool:
    if key == "task" or key.startswith("scheme."):
        return True
    section, _, name = key.partition(".")
    return section == "model" and name in MUST_MATCH_MODEL_FIELDS


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def compare_metadata(
    stored: Mapping[str, Any], current: Mapping[str, Any]
) -> tuple[list[str], list[str], list[str]]:
    """(mismatches, allowed changes, unchecked fields) between a checkpoint's metadata and the
    current run's, each a list of lines like `model.d_model: checkpoint 128, config 256`.

    A field only one side records (added or removed since the checkpoint was written, or a
    checkpoint converted from one without metadata) is listed as unchecked; a scheme option only
    one side records is skipped (it belongs to a scheme whose name already differs).
    """
    old, new = _flatten(_jsonable(dict(stored))), _flatten(_jsonable(dict(current)))
    mismatches, allowed, unchecked = [], [], []
    for key in sorted(set(old) | set(new), key=lambda k: (not _must_match(k), k)):
        if key not in old or key not in new:
            if not key.startswith("scheme."):
                side = "checkpoint" if key not in old else "config"
                unchecked.append(f"{key} (not in the {side})")
            continue
        if old[key] == new[key]:
            continue
        if _must_match(key):
            mismatches.append(f"{key}: checkpoint {_show(old[key])}, config {_show(new[key])}")
        else:
            allowed.append(f"{key}: checkpoint {_show(old[key])}, now {_show(new[key])}")
    return mismatches, allowed, unchecked


def check_compatible(
    stored: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    directory: str = "CKPT_DIR",
    step: int | None = None,
) -> str | None:
    """Raises ValueError naming every field of `stored` (a checkpoint's metadata) that differs
    from `current` and must match; returns one line describing the allowed differences (None
    if there are none). `stored` None (a checkpoint without metadata) is unknown: warns and
    returns None. `directory` and `step` name the checkpoint in messages."""
    where = f"checkpoint {directory}" + ("" if step is None else f" step {step}")
    if stored is None:
        logging.warning(
            "%s has no metadata (saved before checkpoints recorded their config): restoring "
            "without a compatibility check",
            where,
        )
        return None
    mismatches, allowed, unchecked = compare_metadata(stored, current)
    if mismatches:
        hints = []
        if any(m.startswith("model.scan_layers:") for m in mismatches):
            want = str(bool(_flatten(current).get("model.scan_layers"))).lower()
            hints.append(
                "the checkpoint's parameters are in the other layer layout (scanned `layers` "
                "with a leading layer axis vs unrolled `layer_000`...); convert with "
                f"`python -m deepscale_jax.convert --from={directory} "
                f"--to=NEW_WORKDIR/checkpoints --scan_layers={want}` and run with "
                "--workdir=NEW_WORKDIR, or set model.scan_layers to the checkpoint's value"
            )
        if any(not m.startswith("model.scan_layers:") for m in mismatches):
            record = os.path.join(directory, "<step>" if step is None else str(step), "metadata")
            hints.append(
                "these fields change parameter shapes or the computation: resume with the "
                f"checkpoint's values (recorded in {record}/metadata) or start a fresh --workdir"
            )
        raise ValueError(
            f"{where} does not fit the config:\n  "
            + "\n  ".join(mismatches)
            + "".join(f"\nhint: {h}" for h in hints)
        )
    parts = []
    if allowed:
        parts.append("changed (allowed): " + "; ".join(allowed))
    if unchecked:
        parts.append("unchecked: " + ", ".join(unchecked))
    return f"{where}: " + " | ".join(parts) if parts else None


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the latest finished checkpoint is intact."""


#: Texts of a full disk in errors that are not an OSError (e.g. from TensorStore's C++ writes).
_DISK_FULL_TEXTS = ("No space left on device", "ENOSPC", "Disk quota exceeded")


def is_write_failure(error: BaseException) -> bool:
    """An OSError, or another error whose text says the disk is full."""
    return isinstance(error, OSError) or any(t in str(error) for t in _DISK_FULL_TEXTS)


def describe_write_failure(error: BaseException) -> str:
    """'the disk is full', 'the directory is read-only', ... (one line) for a failed write."""
    code = getattr(error, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or any(t in str(error) for t in _DISK_FULL_TEXTS):
        return "the disk is full"
    if code == errno.EROFS:
        return "the file system is read-only"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.ENOENT:
        return "the directory vanished"
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return f"{type(error).__name__}: {text[:200]}"


class Checkpointer:
    """`metadata` (from `checkpoint_metadata`) is written with every save and checked against
    the checkpoint's before every restore; None saves none and checks nothing.

    A failed asynchronous write raises `CheckpointSaveError` from the `save`, `wait` or `close`
    where orbax reports it."""

    def __init__(
        self,
        directory: str,
        every_steps: int,
        max_to_keep: int,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self.every_steps = every_steps
        self.metadata = None if metadata is None else _jsonable(dict(metadata))
        self._checked_step: int | None = None
        self._unfinished: int | None = None  # the step of a save not yet waited for
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int, final_step: int) -> bool:
        return step == final_step or (self.every_steps > 0 and step % self.every_steps == 0)

    def save(self, step: int, state: Any, data_state: dict | None) -> None:
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        if self.metadata is not None:
            args["metadata"] = ocp.args.JsonSave(self.metadata)
        pending = step if self._unfinished is None else self._unfinished
        try:
            self._manager.save(step, args=ocp.args.Composite(**args))
        except Exception as err:
            raise self._save_failed(err, pending) from err
        self._unfinished = step

    def _save_failed(self, error: Exception, step: int | None) -> Exception:
        """`error` (raised while saving `step`) as a one-line CheckpointSaveError naming the
        directory, the step and the checkpoint left intact; any other error unchanged."""
        if not is_write_failure(error):
            return error
        self._unfinished = None
        try:
            latest = self._manager.latest_step()
        except Exception:  # the directory itself may be gone
            latest = None
        if latest is None or latest == step:
            kept = "no earlier checkpoint was finished"
        else:
            kept = (
                f"the previous checkpoint {os.path.join(self.directory, str(latest))} "
                f"(step {latest}) is intact and a rerun resumes from it"
            )
        detail = (str(error).strip().splitlines() or [""])[0][:300]
        return CheckpointSaveError(
            f"saving the checkpoint of step {'?' if step is None else step} to "
            f"{self.directory} failed: {describe_write_failure(error)} ({detail}); {kept}; "
            "free space or choose a "
            "--workdir on a larger disk, then rerun the same command"
        )

    def _has_item(self, step: int, item: str) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), item))

    def read_metadata(self, step: int) -> dict | None:
        """The metadata saved at `step`, or None for a checkpoint saved without it."""
        if not self._has_item(step, "metadata"):
            return None
        args = ocp.args.Composite(metadata=ocp.args.JsonRestore())
        return self._manager.restore(step, args=args)["metadata"]

    def check(self, step: int) -> None:
        """Raises ValueError if the checkpoint at `step` does not fit this run's metadata (see
        `check_compatible`); logs one line with the allowed differences. No-op without
        metadata."""
        if self.metadata is None or step == self._checked_step:
            return
        note = check_compatible(self.read_metadata(step), self.metadata, self.directory, step)
        if note:
            logging.warning("%s", note)
        self._checked_step = step  # a retried restore of the same step neither rechecks nor relogs

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict | None]:
        """The state onto `abstract_state`'s shardings and the data state saved at `step`,
        after `check(step)`."""
        self.check(step)
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        has_data = self._has_item(step, "data")
        if has_data:
            args["data"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"], (restored["data"] if has_data else None)

    def reached_preemption(self, step: int) -> bool:
        """Orbax's preemption sync point: True on every process once the JAX preemption service
        (multi-process runs under `jax.distributed`) has seen a preemption notice."""
        check = getattr(self._manager, "reached_preemption", None)
        return bool(check(step)) if check is not None else False

    def wait(self) -> None:
        """Blocks until the last save is written (CheckpointSaveError if it failed)."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            raise self._save_failed(err, self._unfinished) from err
        self._unfinished = None

    def close(self) -> None:
        """Waits for the last save (as `wait`), then releases the manager."""
        try:
            self.wait()
        finally:
            self._manager.close()


def abstract_state(tree: Any, shardings: Any) -> Any:
    """A restore target: ShapeDtypeStructs of `tree` placed on `shardings` (which may differ
    from the shardings the checkpoint was saved with)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


UNFINISHED_CHECKPOINT = ".orbax-checkpoint-tmp"  # orbax's suffix for a save not yet finalized


def remove_unfinished_checkpoints(directory: str) -> list[str]:
    """Deletes the unfinished saves (`<step>.orbax-checkpoint-tmp*`) a killed run left in the
    checkpoint `directory`; returns their names. Orbax never loads them (only `<step>` names
    count as checkpoints) but does not remove them unless it saves that step again."""
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        if UNFINISHED_CHECKPOINT in name:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
            removed.append(name)
    return removed
