"""Multi-process runs: `jax.distributed.initialize` from flags or the environment.

One training run can span several processes (hosts of a TPU pod, nodes of a GPU cluster, or
several processes on one machine for testing, `deepscale_jax.launch`). Every process runs the same
command; they differ only in their process id. Three ways to say how they find each other:

- explicit: `--coordinator_address=HOST:PORT --num_processes=N --process_id=I` (or the
  environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`; a flag
  wins over its variable). Process 0 hosts the coordinator at HOST:PORT.
- automatic: `--distributed` with none of the above: JAX's cluster detection fills them in on
  Cloud TPU pods (every host runs the command), SLURM (`srun`), Open MPI (`mpirun`) and
  Kubernetes/GKE.
- neither: a single-process run (every device of this machine).

On CPU the processes exchange collectives over gloo (`jax_cpu_collectives_implementation`);
GPUs use NCCL and TPUs their interconnect, whatever that option says.

What each process then does (train.py): it builds the same global batches and keeps its own rows
(data/pipeline.py), its devices join one global mesh, orbax writes every process's shards of a
checkpoint (process 0 writes the metadata and the data-iterator state), and only process 0 logs,
prints and writes metrics.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
    """How this process joins a multi-process run; None fields are left to JAX's cluster
    detection (`auto`)."""

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @property
    def explicit(self) -> bool:
        return self.num_processes is not None or self.process_id is not None


def _int_or_none(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an integer") from None


def resolve_spec(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    auto: bool = False,
    environ: Mapping[str, str] | None = None,
) -> DistributedSpec | None:
    """The spec from flags (None = not given) and `environ` (default os.environ); None for a
    single-process run. Raises ValueError naming a missing or out-of-range value."""
    environ = os.environ if environ is None else environ
    address = coordinator_address or environ.get(ENV_COORDINATOR) or None
    count = _int_or_none(
        num_processes if num_processes is not None else environ.get(ENV_NUM_PROCESSES),
        f"--num_processes (or {ENV_NUM_PROCESSES})",
    )
    index = _int_or_none(
        process_id if process_id is not None else environ.get(ENV_PROCESS_ID),
        f"--process_id (or {ENV_PROCESS_ID})",
    )
    spec = DistributedSpec(address, count, index, auto)
    if not spec.explicit:
        return spec if auto else None
    missing = [
        flag
        for flag, value in (
            (f"--coordinator_address (or {ENV_COORDINATOR})", address),
            (f"--num_processes (or {ENV_NUM_PROCESSES})", count),
            (f"--process_id (or {ENV_PROCESS_ID})", index),
        )
        if value is None
    ]
    if missing and not auto:
        raise ValueError(
            f"a multi-process run needs {', '.join(missing)} as well; give all three, or "
            "--distributed alone to let JAX detect the cluster (TPU pod, SLURM, MPI)"
        )
    if count is not None and count < 1:
        raise ValueError(f"--num_processes={count} must be a positive integer")
    if index is not None and count is not None and not 0 <= index < count:
        raise ValueError(
            f"--process_id={index} must be in [0, {count}) for --num_processes={count}"
        )
    if address is not None and not _is_host_port(address):
        raise ValueError(
            f"--coordinator_address={address!r} must be HOST:PORT (e.g. localhost:12355 or "
            "10.0.0.2:1234), the address of process 0"
        )
    return spec


def _is_host_port(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def initialize(spec: DistributedSpec | None) -> None:
    """Joins the run described by `spec` (no-op for None). Must run before anything touches a
    JAX device (device counts, arrays, jit)."""
    if spec is None:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
    )


def is_main_process() -> bool:
    """Whether this process logs, prints and writes metrics (process 0)."""
    return jax.process_index() == 0


def announce(message: str) -> None:
    """Prints `message` on process 0 only (the others' stdout would repeat it N times)."""
    if is_main_process():
        print(message, flush=True)


def sync(name: str) -> None:
    """Barrier: every process waits here until all reached it (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
