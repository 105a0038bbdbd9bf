"""Running the command-line programs (`deepscale_jax.main`, `deepscale_jax.launch`) from tests:
in the repository root, importable, without the test process's 8 fake devices."""

import json
import os
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The test models are tiny: compiling them (LLVM's optimisation passes) costs far more than
# running them. XLA's backend optimisation level 0 compiles CPU programs ~3x faster and changes
# no program's semantics (the HLO passes still run; no fast-math), only how fast the machine
# code is. conftest.py sets it for the test processes and `cli_env` for the programs they start.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0"


def cli_env() -> dict[str, str]:
    """The test environment with the repository importable and XLA_FLAGS holding only the fast
    compile flags (the program picks its own device count)."""
    return {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": FAST_COMPILE_FLAGS}


def run_cli(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs `args` to completion and asserts it exited 0 (showing its stderr if not)."""
    result = subprocess.run(
        args, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


def start_cli(args: list[str], workdir: str, until_step: int, log_dir: str):
    """Starts `args` (output to files in `log_dir`, so no pipe fills up) and returns
    (the process, a function giving its (stdout, stderr)) once `workdir`'s metrics.jsonl logs a
    step >= `until_step`."""
    out_path, err_path = os.path.join(log_dir, "stdout"), os.path.join(log_dir, "stderr")
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(args, cwd=ROOT, env=cli_env(), stdout=out, stderr=err, text=True)

    def output() -> tuple[str, str]:
        with open(out_path) as out, open(err_path) as err:
            return out.read(), err.read()

    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline:
        assert proc.poll() is None, output()[1][-3000:]
        if os.path.exists(metrics):
            with open(metrics) as f:
                steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
            if steps and max(steps) >= until_step:
                return proc, output
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no step {until_step} logged in time")
