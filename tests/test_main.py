"""The command line: a smoke run, a resume, and a bad flag, as a user would type them."""

import os
import subprocess
import sys

import pytest

from tests.cli import ROOT, cli_env


def _main(*args, env_extra=None):
    env = {**cli_env(), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "deepscale_jax.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_trains_then_resumes(data_dir, tmp_path):
    args = [
        "--config=configs/lm.py:smoke",
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.data_dir={data_dir}",
        f"--compilation_cache_dir={tmp_path / 'cache'}",
    ]
    first = _main(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "final validation" in first.stdout
    assert os.listdir(tmp_path / "cache")  # the compiled steps, for the rerun to load
    second = _main(*args, "--config.train.num_steps=9")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Resuming from checkpoint at step 6" in second.stdout
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["6", "9"]
    # An error found at run time (the checkpoint does not fit the config): a message, no
    # traceback, exit status 1, the checkpoints untouched.
    third = _main(*args, "--config.model.num_heads=4")
    assert third.returncode == 1
    assert "model.num_heads: checkpoint 2, config 4" in third.stderr
    assert "Traceback" not in third.stderr
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["6", "9"]


def test_cli_bad_config_is_one_clear_line(tmp_path):
    result = _main("--config=configs/lm.py:smoke,heads=3", f"--workdir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "model.num_heads=3 does not divide model.d_model=32" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow  # ~20 s alone; the LM CLI test covers the same path in the default suite
def test_cli_vit_smoke_trains_then_resumes(tmp_path):
    args = ["--config=configs/vit.py:smoke", f"--workdir={tmp_path / 'run'}"]
    first = _main(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "final validation loss" in first.stdout and "test loss" in first.stdout
    second = _main(*args, "--config.train.num_steps=9")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Resuming from checkpoint at step 6" in second.stdout
