"""Batches onto the devices: global sharded arrays, transferred ahead of the step that uses them.

`to_global` turns this process's rows of a batch into one global array per field, sharded over
the mesh's batch axes. `DeviceFeed` wraps a training iterator and keeps `depth` batches already
placed on the devices: when step k takes batch k, the host-to-device copies of batches
k+1..k+depth are already issued, so they run while step k computes (JAX transfers are
asynchronous; the host work of producing a batch overlaps the device as long as the loop does
not block). A checkpoint must record the data position of the batches the *steps* consumed, not
of those in flight: the feed remembers the wrapped iterator's state after each batch it hands
out, and `get_state` returns that, so resuming never skips the prefetched batches.
"""

from __future__ import annotations

import collections
import copy
from typing import Any

import jax
import numpy as np


def to_global(batch: dict, batch_sharding: jax.sharding.NamedSharding) -> dict:
    """This process's rows -> one global array per field, sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
        for k, v in batch.items()
    }


class DeviceFeed:
    """An iterator of global, device-placed batches from a host iterator with `get_state` /
    `set_state`, keeping `depth` batches in flight (0: each batch is transferred when taken).

    `get_state()` is the wrapped iterator's state right after the last batch this feed returned
    (not after the batches in flight); `set_state(state)` drops the batches in flight and
    repositions the wrapped iterator."""

    def __init__(self, iterator: Any, batch_sharding: jax.sharding.NamedSharding, depth: int):
        if depth < 0:
            raise ValueError(f"train.prefetch_batches={depth} must be >= 0")
        self._iterator = iterator
        self._sharding = batch_sharding
        self._depth = depth
        self._in_flight: collections.deque[tuple[dict, Any]] = collections.deque()
        self._state = copy.deepcopy(iterator.get_state())

    def __iter__(self) -> DeviceFeed:
        return self

    def __next__(self) -> dict:
        self._fill(self._depth + 1)
        batch, self._state = self._in_flight.popleft()
        self._fill(self._depth)  # start the next transfers before the caller's step runs
        return batch

    def _fill(self, size: int) -> None:
        while len(self._in_flight) < size:
            host = next(self._iterator)
            state = copy.deepcopy(self._iterator.get_state())
            self._in_flight.append((to_global(host, self._sharding), state))

    def get_state(self) -> Any:
        return copy.deepcopy(self._state)

    def set_state(self, state: Any) -> None:
        self._in_flight.clear()
        self._iterator.set_state(state)
        self._state = copy.deepcopy(state)
