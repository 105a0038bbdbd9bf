"""Start one training run as N local processes (a multi-host run on one machine).

    python -m deepscale_jax.launch --num_processes=2 --devices_per_process=4 -- \\
        --config=configs/lm.py:smoke --workdir=runs/mp

starts N copies of `python -m deepscale_jax.main <args after -->` that join through
`jax.distributed` (coordinator `localhost:<free port>`, `--process_id` 0..N-1). On CPU each
process gets `--devices_per_process` host devices (XLA's forced host-platform device count) and
the processes run their collectives over gloo; with `--platform=gpu` each process sees its own
`--devices_per_process` GPUs through CUDA_VISIBLE_DEVICES. This is how the multi-process code path
is tested without a cluster (tests/test_multiprocess.py); on a TPU pod or a SLURM cluster run
`deepscale_jax.main --distributed` on every host instead (README "Multi-process runs").

Process 0 writes to this terminal; process i > 0 writes to `<log_dir>/process_<i>.log` (a
temporary directory unless `--log_dir` is given). If any process fails, the others are killed
and the launcher exits with the failed process's exit code after printing the tail of its log.
SIGTERM or SIGINT to the launcher is passed on to every process as SIGTERM (the run saves a
checkpoint at a step all processes agree on and exits 0 when JAX's preemption service is on).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
STOP_GRACE_SECONDS = 30.0


def free_port() -> int:
    """A TCP port that is free on localhost now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def with_device_count(xla_flags: str, count: int) -> str:
    """`xla_flags` with the forced host device count set to `count` (replacing any given)."""
    kept = [f for f in xla_flags.split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={count}"])


def process_env(
    base: Mapping[str, str], index: int, devices_per_process: int, platform: str
) -> dict[str, str]:
    """The environment of process `index`: CPU gets a forced device count and JAX_PLATFORMS=cpu;
    GPU gets its slice of CUDA_VISIBLE_DEVICES."""
    env = dict(base)
    if platform == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = with_device_count(env.get("XLA_FLAGS", ""), devices_per_process)
    else:
        first = index * devices_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(
            str(d) for d in range(first, first + devices_per_process)
        )
    return env


def process_command(main_args: Sequence[str], port: int, count: int, index: int) -> list[str]:
    """The command line of process `index` of `count`."""
    return [
        sys.executable,
        "-m",
        "deepscale_jax.main",
        *main_args,
        f"--coordinator_address=localhost:{port}",
        f"--num_processes={count}",
        f"--process_id={index}",
    ]


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _stop(procs: Sequence[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    """Sends `sig` to the running processes, waits up to STOP_GRACE_SECONDS, then kills."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(sig)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def launch(
    main_args: Sequence[str],
    num_processes: int,
    devices_per_process: int,
    platform: str = "cpu",
    log_dir: str | None = None,
    poll_seconds: float = 0.2,
) -> int:
    """Runs the N processes to completion; returns 0 or the first failing exit code."""
    log_dir = log_dir or tempfile.mkdtemp(prefix="deepscale_launch_")
    os.makedirs(log_dir, exist_ok=True)
    port = free_port()
    procs: list[subprocess.Popen] = []
    logs: list[Any] = []
    forwarded = {"signal": None}

    def forward(signum: int, frame: Any) -> None:
        forwarded["signal"] = signum
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for index in range(num_processes):
            env = process_env(os.environ, index, devices_per_process, platform)
            out: Any = None
            if index > 0:
                out = open(os.path.join(log_dir, f"process_{index}.log"), "w")  # noqa: SIM115
                logs.append(out)
            procs.append(
                subprocess.Popen(
                    process_command(main_args, port, num_processes, index),
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT if out is not None else None,
                )
            )
        print(
            f"launched {num_processes} processes x {devices_per_process} {platform} devices "
            f"(coordinator localhost:{port}; logs of processes 1..: {log_dir})",
            flush=True,
        )
        while True:
            codes = [proc.poll() for proc in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed and forwarded["signal"] is None:
                index = failed[0]
                # SIGKILL: a SIGTERM would start a preemption save that waits for the dead peer.
                _stop(procs, signal.SIGKILL)
                where = os.path.join(log_dir, f"process_{index}.log")
                detail = f"; last lines of {where}:\n{_tail(where)}" if index else ""
                print(f"process {index} exited with {codes[index]}{detail}", file=sys.stderr)
                return codes[index]
            if all(c is not None for c in codes):
                return next((c for c in codes if c), 0)
            time.sleep(poll_seconds)
    finally:
        _stop(procs, signal.SIGKILL)
        for log in logs:
            log.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(launcher options, the arguments after `--` for deepscale_jax.main)."""
    argv = list(argv)
    if "--" not in argv:
        raise SystemExit(
            "usage: python -m deepscale_jax.launch --num_processes=N [--devices_per_process=K] "
            "-- --config=... --workdir=... (the arguments of deepscale_jax.main after --)"
        )
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m deepscale_jax.launch")
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--log_dir", default=None)
    options = parser.parse_args(argv[:cut])
    for name in ("num_processes", "devices_per_process"):
        if getattr(options, name) < 1:
            parser.error(f"--{name}={getattr(options, name)} must be a positive integer")
    return options, argv[cut + 1 :]


def main(argv: Sequence[str] | None = None) -> int:
    options, main_args = parse_args(sys.argv[1:] if argv is None else argv)
    return launch(
        main_args,
        options.num_processes,
        options.devices_per_process,
        options.platform,
        options.log_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
