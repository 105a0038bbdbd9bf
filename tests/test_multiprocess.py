"""Multi-process runs (issue 7, part 5): N local processes joined through `jax.distributed`
(gloo collectives on CPU) train, checkpoint, resume and stop on SIGTERM like one process with
the same devices. The launches go through `deepscale_jax.launch`, as a user's would."""

import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from configs import lm
from deepscale_jax import distributed, launch
from deepscale_jax.metrics import read_metrics
from deepscale_jax.train import train_and_evaluate
from tests.cli import ROOT, cli_env, run_cli, start_cli

# Constant learning rate: a run stopped at step 4 and resumed with train.num_steps=8 follows
# the same schedule as a run of 8 steps.
SMOKE = "smoke,optim.schedule=constant,train.log_every_steps=1"


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(str(workdir)) if "train/loss" in r}


def _launch_args(data_dir, workdir, num_steps, *extra, processes=2, devices=4):
    return [
        sys.executable,
        "-m",
        "deepscale_jax.launch",
        f"--num_processes={processes}",
        f"--devices_per_process={devices}",
        f"--log_dir={workdir}_logs",
        "--",
        f"--config=configs/lm.py:{SMOKE},steps={num_steps}",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        *extra,
    ]


@pytest.mark.multiprocess  # ~45 s: two 2-process launches and one in-process run
def test_two_processes_train_checkpoint_and_resume_like_one_process(data_dir, tmp_path):
    """2 processes x 4 devices: steps 1-4 (checkpoint), then a second launch resumes to step 8;
    the losses equal one process on 8 devices (this test process) step by step, up to the
    reduction order of the cross-process all-reduce."""
    config = lm.get_config(f"{SMOKE},steps=8")
    config.data.data_dir = data_dir
    single = tmp_path / "single"
    train_and_evaluate(config, str(single))

    multi = tmp_path / "multi"
    first = run_cli(_launch_args(data_dir, multi, 4, "--config.ckpt.every_steps=2"))
    assert "launched 2 processes x 4 cpu devices" in first.stdout
    assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]
    second = run_cli(_launch_args(data_dir, multi, 8))
    assert "Resuming from checkpoint at step 4" in second.stdout
    assert second.stdout.count("Resuming from checkpoint") == 1  # process 0 prints, alone

    expected, got = _losses(single), _losses(multi)
    assert sorted(expected) == sorted(got) == list(range(1, 9))
    np.testing.assert_allclose(
        [got[s] for s in range(1, 9)], [expected[s] for s in range(1, 9)], rtol=2e-6
    )
    with open(multi / "config.json") as f:
        assert json.load(f)["train"]["num_steps"] == 8
    with open(multi / "checkpoints" / "8" / "metadata" / "metadata") as f:
        assert json.load(f)["mesh"]["processes"] == 2


@pytest.mark.slow  # ~50 s: a 2-process run stopped by SIGTERM, then resumed
@pytest.mark.multiprocess
def test_sigterm_to_the_launcher_saves_one_agreed_step_and_exits_0(data_dir, tmp_path):
    """SIGTERM reaches every process; JAX's preemption service and orbax's sync point make them
    save the same step, and the relaunch resumes from it."""
    workdir = tmp_path / "run"
    args = _launch_args(
        data_dir,
        workdir,
        100000,
        "--config.ckpt.every_steps=100000",
        "--config.train.eval_every_steps=100000",
    )
    proc, output = start_cli(args, str(workdir), until_step=3, log_dir=str(tmp_path))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    saved = [int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3
    assert f"preempted at step {saved[0]}; checkpoint saved" in output()[0]

    resumed = run_cli(_launch_args(data_dir, workdir, saved[0] + 2))
    assert f"Resuming from checkpoint at step {saved[0]}" in resumed.stdout
    assert sorted(_losses(workdir))[-1] == saved[0] + 2


def test_a_failing_process_stops_the_others_with_its_exit_code(tmp_path):
    """A bad argument makes every process exit 1 at once; the launcher reports it and stops."""
    args = [
        sys.executable,
        "-m",
        "deepscale_jax.launch",
        "--num_processes=2",
        "--",
        "--config=configs/lm.py:smoke,layers=0",
        f"--workdir={tmp_path / 'run'}",
    ]
    result = subprocess.run(
        args, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "model.num_layers=0" in result.stderr
    assert "exited with 1" in result.stderr


@pytest.mark.parametrize(
    ("flags", "environ", "expected"),
    [
        ((None, None, None, False), {}, None),
        (
            ("localhost:1234", 2, 1, False),
            {},
            distributed.DistributedSpec("localhost:1234", 2, 1),
        ),
        (
            (None, None, None, False),
            {
                "JAX_COORDINATOR_ADDRESS": "10.0.0.2:99",
                "JAX_NUM_PROCESSES": "4",
                "JAX_PROCESS_ID": "3",
            },
            distributed.DistributedSpec("10.0.0.2:99", 4, 3),
        ),
        (
            (None, None, 0, False),
            {"JAX_PROCESS_ID": "3", "JAX_NUM_PROCESSES": "2", "JAX_COORDINATOR_ADDRESS": "h:1"},
            distributed.DistributedSpec("h:1", 2, 0),
        ),
        ((None, None, None, True), {}, distributed.DistributedSpec(auto=True)),
    ],
)
def test_resolve_spec_reads_flags_then_the_environment(flags, environ, expected):
    assert distributed.resolve_spec(*flags, environ=environ) == expected


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ((None, 2, 0, False), "needs --coordinator_address"),
        (("localhost:1", 2, 2, False), "--process_id=2 must be in [0, 2)"),
        (("localhost:1", 0, 0, False), "--num_processes=0 must be a positive integer"),
        (("localhost", 2, 0, False), "--coordinator_address='localhost' must be HOST:PORT"),
    ],
)
def test_resolve_spec_names_the_bad_value(flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        distributed.resolve_spec(*flags, environ={})


def test_launcher_gives_each_process_its_devices_and_the_coordinator():
    env = launch.process_env(
        {"XLA_FLAGS": "--xla_foo=1 " + launch.DEVICE_COUNT_FLAG + "=8"}, 1, 4, "cpu"
    )
    assert env["XLA_FLAGS"] == f"--xla_foo=1 {launch.DEVICE_COUNT_FLAG}=4"
    assert env["JAX_PLATFORMS"] == "cpu"
    assert launch.process_env({}, 1, 2, "gpu")["CUDA_VISIBLE_DEVICES"] == "2,3"
    command = launch.process_command(["--config=c", "--workdir=w"], 555, 2, 1)
    assert command[-3:] == [
        "--coordinator_address=localhost:555",
        "--num_processes=2",
        "--process_id=1",
    ]
