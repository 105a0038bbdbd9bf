"""Orbax CheckpointManager wrapper: save, restore-latest-or-None, with the data iterator state.

A checkpoint at step s under `workdir/checkpoints/s/` holds two items:
- `state`: the TrainState pytree (params, optimizer state, step, rng), restored onto the
  shardings of an abstract target, so a restore never depends on how it was saved;
- `data`: the data iterator state (JSON), so a resumed run sees the batches the uninterrupted
  run would have seen.
Saves are asynchronous; `close()` waits for the last one. Orbax writes each step to a temporary
directory and renames it when complete, so an interrupted save never replaces a finished one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, every_steps: int, max_to_keep: int) -> None:
        self.directory = os.path.abspath(directory)
        self.every_steps = every_steps
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def should_save(self, step: int, final_step: int) -> bool:
        return step == final_step or (self.every_steps > 0 and step % self.every_steps == 0)

    def save(self, step: int, state: Any, data_state: dict | None) -> None:
        args = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        self._manager.save(step, args=ocp.args.Composite(**args))

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict | None]:
        """The state onto `abstract_state`'s shardings and the data state saved at `step`."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
        if has_data:
            args["data"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        return restored["state"], (restored["data"] if has_data else None)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_state(tree: Any, shardings: Any) -> Any:
    """A restore target: ShapeDtypeStructs of `tree` placed on `shardings` (which may differ
    from the shardings the checkpoint was saved with)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
