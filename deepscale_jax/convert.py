r"""Convert a checkpoint between the scanned and the unrolled layer layout.

    python -m deepscale_jax.convert --from=OLD_WORKDIR/checkpoints \
        --to=NEW_WORKDIR/checkpoints --scan_layers=false [--step=N]

A scanned stack stores each layer parameter once with a leading layer axis
(`<stack>/layers/attn/q/kernel`: (N, ...)); an unrolled one stores one subtree per layer
(`<stack>/layer_000/attn/q/kernel`: (...)). `model.scan_layers` picks the layout, and a checkpoint
restores only into the layout it was saved in. This tool rewrites one step (default: the latest)
of a checkpoint directory into a new directory in the other layout: the parameters and every
parameter-shaped subtree of the optimizer state (Adam's mu and nu), found as the dicts that are
stacks (`{"layers": ...}` or `{"layer_000": ..., ...}`) anywhere in the state. Everything else
(step, rng, optimizer counters, the data iterator state) is copied; the metadata item gets
`model.scan_layers` flipped and a `converted_from` record. Then run with
`--workdir=NEW_WORKDIR --config.model.scan_layers=false` to resume in the new layout.

The arrays are read to host memory as numpy (so any device count runs it, and nothing of the
old mesh is carried along) and written unsharded; a training run restores them onto its own
shardings. Single process only.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from deepscale_jax.nn.stack import SCANNED_LAYERS, UNROLLED_LAYER, unstack_layers


def is_scanned_stack(node: Any) -> bool:
    return isinstance(node, Mapping) and set(node) == {SCANNED_LAYERS}


def is_unrolled_stack(node: Any) -> bool:
    return (
        isinstance(node, Mapping)
        and bool(node)
        and all(isinstance(k, str) and UNROLLED_LAYER.fullmatch(k) for k in node)
    )


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, Mapping):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in _leaves(v)]
    return [] if tree is None else [tree]


def _map(fn: Any, *trees: Any) -> Any:
    """`fn` over the array leaves of same-structured nested dicts/lists (None stays None)."""
    first = trees[0]
    if isinstance(first, Mapping):
        return {k: _map(fn, *(t[k] for t in trees)) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_map(fn, *xs) for xs in zip(*trees, strict=True))
    return None if first is None else fn(*trees)


def unstack(stack: Mapping, path: str) -> dict:
    """{"layers": leaves (N, ...)} -> {"layer_000": leaves (...), ...} (numpy)."""
    depths = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in _leaves(stack)}
    if len(depths) != 1 or None in depths:
        raise ValueError(f"{path}/layers: leaves disagree on the layer axis (sizes {depths})")
    (depth,) = depths
    layers = unstack_layers({SCANNED_LAYERS: _map(np.asarray, stack[SCANNED_LAYERS])}, depth)
    return {name: _map(np.ascontiguousarray, layer) for name, layer in layers.items()}


def stack(stack: Mapping, path: str) -> dict:
    """{"layer_000": ..., "layer_001": ...} -> {"layers": leaves stacked on a new axis 0}."""
    by_index = {int(UNROLLED_LAYER.fullmatch(k).group(1)): k for k in stack}
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"{path}: layers {sorted(by_index)} are not numbered 0..N-1")
    layers = [stack[by_index[i]] for i in range(len(by_index))]
    return {SCANNED_LAYERS: _map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)}


def convert_tree(tree: Any, scan_layers: bool, path: str = "") -> tuple[Any, list[str]]:
    """`tree` (nested dicts/lists of arrays, e.g. a raw TrainState) with every layer stack in the
    layout `scan_layers` asks for; also the paths of the stacks converted. Stacks already in that
    layout are an error (the checkpoint has the layout already)."""
    if (scan_layers and is_scanned_stack(tree)) or (not scan_layers and is_unrolled_stack(tree)):
        layout = "scanned" if scan_layers else "unrolled"
        raise ValueError(f"{path or '/'} is already {layout} (model.scan_layers={scan_layers})")
    if scan_layers and is_unrolled_stack(tree):
        return stack(tree, path), [path]
    if not scan_layers and is_scanned_stack(tree):
        return unstack(tree, path), [path]
    if isinstance(tree, Mapping):
        out, found = {}, []
        for key, value in tree.items():
            out[key], sub = convert_tree(value, scan_layers, f"{path}/{key}")
            found += sub
        return out, found
    if isinstance(tree, (list, tuple)):
        items, found = [], []
        for i, value in enumerate(tree):
            item, sub = convert_tree(value, scan_layers, f"{path}/{i}")
            items.append(item)
            found += sub
        return type(tree)(items), found
    return tree, []


def read_state(step_dir: str) -> Any:
    """The `state` item of a checkpoint step as a raw tree of numpy arrays (dicts and lists, as
    stored; no target structure, no device placement)."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        path = epath.Path(step_dir) / "state"
        tree = handler.metadata(path).tree
        restore_args = _map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return handler.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    finally:
        handler.close()


def convert_checkpoint(src: str, dst: str, scan_layers: bool, step: int | None = None) -> int:
    """Writes step `step` (default: the latest) of the checkpoint directory `src` into `dst`
    in the layout `scan_layers`; returns the step. Raises ValueError if `src` has no such
    step, has no layer stack, or is in that layout already."""
    src, dst = os.path.abspath(src), os.path.abspath(dst)
    if src == dst:
        raise ValueError("--from and --to are the same directory; write to a new one")
    source = ocp.CheckpointManager(src, item_names=("state", "data", "metadata"))
    try:
        steps = source.all_steps()
        if not steps:
            raise ValueError(
                f"no checkpoint in {src} (expected numbered step directories, e.g. "
                "WORKDIR/checkpoints)"
            )
        step = max(steps) if step is None else step
        if step not in steps:
            raise ValueError(f"{src} has no step {step}; it has {sorted(steps)}")
        step_dir = os.path.join(src, str(step))
        state, converted = convert_tree(read_state(step_dir), scan_layers)
        if not converted:
            raise ValueError(f"{step_dir} holds no layer stack (no layers/ or layer_000/ dict)")
        extra = {}
        for item in ("data", "metadata"):
            if os.path.isdir(os.path.join(step_dir, item)):
                args = ocp.args.Composite(**{item: ocp.args.JsonRestore()})
                extra[item] = source.restore(step, args=args)[item]
    finally:
        source.close()

    metadata = dict(extra.get("metadata") or {"version": 1})
    model = dict(metadata.get("model") or {})
    metadata["converted_from"] = {
        "directory": src,
        "step": step,
        "scan_layers": model.get("scan_layers", not scan_layers),
        "stacks": converted,
    }
    model["scan_layers"] = scan_layers
    metadata["model"] = model
    extra["metadata"] = metadata

    target = ocp.CheckpointManager(
        dst, options=ocp.CheckpointManagerOptions(create=True), item_names=("state", *extra)
    )
    try:
        if step in target.all_steps():
            raise ValueError(f"{dst} already has step {step}; choose an empty --to directory")
        args = {"state": ocp.args.StandardSave(state)}
        args.update({k: ocp.args.JsonSave(v) for k, v in extra.items()})
        target.save(step, args=ocp.args.Composite(**args))
        target.wait_until_finished()
    finally:
        target.close()
    return step


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered in ("true", "1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deepscale_jax.convert",
        description="Convert a checkpoint between the scanned and unrolled layer layouts.",
    )
    parser.add_argument("--from", dest="src", required=True, help="checkpoint directory to read")
    parser.add_argument(
        "--to", dest="dst", required=True, help="checkpoint directory to write (new)"
    )
    parser.add_argument(
        "--scan_layers",
        type=_bool,
        required=True,
        help="the layout to write: true = scanned, false = unrolled",
    )
    parser.add_argument("--step", type=int, default=None, help="step to convert (default latest)")
    args = parser.parse_args(argv)
    try:
        step = convert_checkpoint(args.src, args.dst, args.scan_layers, args.step)
    except ValueError as err:
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    layout = "scanned" if args.scan_layers else "unrolled"
    print(f"wrote step {step} ({layout} layers) to {os.path.abspath(args.dst)}", flush=True)


if __name__ == "__main__":
    main()
