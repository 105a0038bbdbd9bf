"""Preemption: SIGTERM (and orbax's multi-process preemption sync point) turns into "save the
current step and stop" for the training loop (train.py), instead of killing the process."""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax

from deepscale_jax.checkpoint import Checkpointer


class Preemption:
    """Context manager: SIGTERM sets `requested` (instead of killing the process) and the
    previous handler is restored on exit; `reached(step)` also honours orbax's preemption sync
    point (`CheckpointManager.reached_preemption`, which agrees on a step across processes and is
    False unless `jax.distributed` runs with its preemption service).

    The handler is installed only on the main thread of a single-process run: with several
    processes a local flag would let them disagree on the step to save at (orbax's sync point is
    the multi-process path; JAX's preemption service listens for SIGTERM itself)."""

    def __init__(self, ckpt: Checkpointer) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False
        self._ckpt = ckpt

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGTERM, previous)
            self._installed = False

    def reached(self, step: int) -> bool:
        """Whether to stop after `step` (to be called at every step, on every process)."""
        return self.requested or self._ckpt.reached_preemption(step)
