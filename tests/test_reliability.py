"""Reliability (issue 7): non-finite steps are skipped and a streak stops the run; SIGTERM saves
and exits cleanly; a run killed mid-flight and rerun gives the uninterrupted run's losses."""

import os
import re
import shutil
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm
from deepscale_jax import sharding
from deepscale_jax import train as train_lib
from deepscale_jax.checkpoint import Checkpointer, abstract_state
from deepscale_jax.data.device_feed import to_global
from deepscale_jax.metrics import read_metrics
from deepscale_jax.optim import make_optimizer, make_schedule
from deepscale_jax.tasks import build_task
from deepscale_jax.train import (
    TrainingDiverged,
    create_train_state,
    jit_train_step,
    train_and_evaluate,
)
from deepscale_jax.validation import validate_config
from tests.cli import run_cli, start_cli


def smoke_config(data_dir, *extra):
    config = lm.get_config(",".join(["smoke", *extra]))
    config.data.data_dir = data_dir
    return config


class _PoisonedIterator:
    """The train iterator, adding a `poison` field (1.0 on the batch of a poisoned step; the
    k-th batch is step k's) and calling `on_step(k)` before yielding step k's batch."""

    def __init__(self, inner, steps, on_step=None):
        self._inner, self._steps, self._on_step = inner, steps, on_step
        self.count = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self._inner))
        self.count += 1
        rows = len(next(iter(batch.values())))
        batch["poison"] = np.full((rows,), float(self.count in self._steps), np.float32)
        if self._on_step is not None:
            self._on_step(self.count)
        return batch

    def get_state(self):
        return {"inner": self._inner.get_state(), "count": self.count}

    def set_state(self, state):
        self._inner.set_state(state["inner"])
        self.count = state["count"]


class PoisonedTask:
    """Test-only wrapper: the task whose training loss is NaN at the given steps."""

    def __init__(self, task, steps=(), on_step=None):
        self._task, self._steps, self._on_step = task, set(steps), on_step

    def __getattr__(self, name):
        return getattr(self._task, name)

    def iterator(self, split, training):
        inner = self._task.iterator(split, training)
        if split != "train":
            return inner
        return _PoisonedIterator(inner, self._steps, self._on_step)

    def loss(self, params, batch, **kwargs):
        batch = dict(batch)
        poison = batch.pop("poison")
        total, count = self._task.loss(params, batch, **kwargs)
        return total * jnp.where(poison.sum() > 0, jnp.nan, 1.0), count


def poison(monkeypatch, steps=(), on_step=None):
    """Makes train_and_evaluate build its task wrapped in `PoisonedTask`."""
    monkeypatch.setattr(
        train_lib, "build_task", lambda *args: PoisonedTask(build_task(*args), steps, on_step)
    )


def _losses(workdir):
    """{step: train/loss}, asserting no step is logged twice."""
    records = [r for r in read_metrics(workdir) if "train/loss" in r]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), steps
    return {r["step"]: r["train/loss"] for r in records}


def _restore(config, workdir, step):
    """The TrainState saved at `step` in `workdir`."""
    model_cfg, scheme = validate_config(config)
    task = build_task(config, model_cfg, scheme)
    mesh = sharding.make_mesh(config.mesh.shape.to_dict())
    tx = make_optimizer(config.optim, config.train.num_steps)
    state, shardings = create_train_state(
        task.model, tx, mesh, sharding.DEFAULT_RULES, config.train.seed, task.init_inputs()
    )
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), 1, 2)
    try:
        restored, _ = ckpt.restore(step, abstract_state(state, shardings))
    finally:
        ckpt.close()
    return jax.device_get(restored)


def _all_finite(tree):
    return all(np.isfinite(x).all() for x in jax.tree.leaves(tree))


# --- 1. divergence guard -------------------------------------------------------------------


def test_nonfinite_step_keeps_params_and_optimizer_and_counts(data_dir):
    config = smoke_config(data_dir, "model.dropout=0.0")
    model_cfg, scheme = validate_config(config)
    task = PoisonedTask(build_task(config, model_cfg, scheme))
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    tx = make_optimizer(config.optim, 10)
    state, shardings = create_train_state(
        task.model, tx, mesh, sharding.DEFAULT_RULES, 0, task.init_inputs()
    )
    batch_sharding = sharding.batch_sharding(mesh)
    step = jit_train_step(
        task, tx, make_schedule(config.optim, 10), shardings, batch_sharding, max_bad_steps=2
    )
    inputs = np.random.default_rng(0).integers(0, 256, (8, 32), dtype=np.int32)

    def batch(bad):
        b = {"inputs": inputs, "targets": np.roll(inputs, -1, 1), "poison": np.full(8, bad)}
        return to_global({k: np.asarray(v) for k, v in b.items()}, batch_sharding)

    good1, _ = step(state, batch(0.0))
    before = jax.device_get(good1)
    bad, metrics = step(good1, batch(1.0))
    after = jax.device_get(bad)
    assert int(after.step) == 2 and int(after.bad_steps) == 1 and int(after.skipped_steps) == 1
    for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(before.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(after.opt_state), jax.tree.leaves(before.opt_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert float(metrics["train/skipped"]) == 1.0 and float(metrics["train/loss"]) == 0.0
    # The learning rate logged is the one the optimizer applies: its count did not advance.
    good2, metrics = step(bad, batch(0.0))
    lr_at_1 = float(make_schedule(config.optim, 10)(1))
    assert float(metrics["train/learning_rate"]) == pytest.approx(lr_at_1)
    assert int(good2.bad_steps) == 0 and int(good2.skipped_steps) == 1
    assert _all_finite(jax.device_get(good2.params))
    # Two bad steps in a row reach max_bad_steps=2: the state then freezes, even on a good batch.
    frozen, _ = step(good2, batch(1.0))
    frozen, _ = step(frozen, batch(1.0))
    frozen, metrics = step(frozen, batch(0.0))
    assert int(frozen.bad_steps) == 3 and float(metrics["train/skipped"]) == 1.0


@pytest.mark.slow  # > 20 s: whole smoke runs (the default run keeps the step and stop tests)
def test_single_nan_step_is_skipped_logged_and_the_run_finishes(data_dir, tmp_path, monkeypatch):
    poison(monkeypatch, steps={3})
    config = smoke_config(data_dir, "train.log_every_steps=1", "train.eval_every_steps=100")
    workdir = str(tmp_path / "run")
    final = train_and_evaluate(config, workdir)
    records = {r["step"]: r for r in read_metrics(workdir) if "train/loss" in r}
    assert [records[s]["train/skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert np.isnan(records[3]["train/loss"])  # the whole (1-step) interval was skipped
    assert all(np.isfinite(records[s]["train/loss"]) for s in (1, 2, 4, 5, 6))
    assert np.isfinite(final["eval/validation/loss"]) and final["train/skipped_steps"] == 1
    state = _restore(config, workdir, 6)
    assert int(state.step) == 6 and int(state.skipped_steps) == 1 and int(state.bad_steps) == 0
    assert _all_finite(state.params) and _all_finite(state.opt_state)


def test_persistent_nan_stops_with_the_last_good_checkpoint_intact(data_dir, tmp_path, monkeypatch):
    poison(monkeypatch, steps=set(range(5, 100)))
    config = smoke_config(
        data_dir,
        "steps=20",
        "train.max_bad_steps=3",
        "train.log_every_steps=2",
        "train.eval_every_steps=100",
        "ckpt.every_steps=2",
    )
    workdir = str(tmp_path / "run")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    # Steps 5, 6, 7 skipped: the limit is reached at step 7 and read at step 8 (a log step);
    # step 6's checkpoint is not saved (mid-streak), so step 4 is the last good one.
    expected = (
        r"3 consecutive steps \(5\.\.7, train.max_bad_steps=3\) had a non-finite loss or "
        r"gradient.*stopped at step 8; the last good checkpoint is "
        + re.escape(f"{ckpt_dir}/4 (step 4)")
    )
    with pytest.raises(TrainingDiverged, match=expected):
        train_and_evaluate(config, workdir)
    assert sorted(os.listdir(ckpt_dir), key=int) == ["2", "4"]
    state = _restore(config, workdir, 4)
    assert int(state.step) == 4 and int(state.bad_steps) == 0
    assert _all_finite(state.params) and _all_finite(state.opt_state)
    assert read_metrics(workdir)[-1]["train/skipped_steps"] == 4  # steps 5..8


def test_checkpoint_without_the_skip_counters_restores_with_zeros(tmp_path):
    repl = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    zero = jnp.zeros((), jnp.int32)
    fresh = train_lib.TrainState(zero, {"w": jnp.zeros(4)}, {"m": jnp.zeros(4)}, zero, zero, zero)
    shardings = jax.tree.map(lambda _: repl, fresh)
    old = {  # a TrainState as saved before it had bad_steps / skipped_steps
        "step": jnp.array(3, jnp.int32),
        "params": {"w": jnp.ones(4)},
        "opt_state": {"m": jnp.full(4, 2.0)},
        "rng": jnp.array(7, jnp.int32),
    }
    ckpt = Checkpointer(str(tmp_path / "ckpt"), 1, 2)
    ckpt.save(3, old, {"pos": 1})
    ckpt.wait()
    state, data = train_lib.restore_train_state(ckpt, 3, fresh, shardings)
    ckpt.close()
    assert data == {"pos": 1} and int(state.step) == 3 and int(state.rng) == 7
    assert int(state.bad_steps) == 0 and int(state.skipped_steps) == 0
    np.testing.assert_array_equal(state.params["w"], np.ones(4))


def test_max_bad_steps_is_validated(data_dir, tmp_path):
    with pytest.raises(ValueError, match=r"train.max_bad_steps=0 must be a positive integer"):
        train_and_evaluate(smoke_config(data_dir, "train.max_bad_steps=0"), str(tmp_path / "r"))


# --- 2. preemption ---------------------------------------------------------------------------


@pytest.mark.slow  # > 20 s: whole smoke runs (the default run keeps the step and stop tests)
def test_sigterm_saves_the_current_step_returns_and_the_rerun_resumes(
    data_dir, tmp_path, monkeypatch, capsys
):
    def term_at_5(step):
        if step == 5:
            signal.raise_signal(signal.SIGTERM)  # while step 5's batch is being fetched

    poison(monkeypatch, on_step=term_at_5)
    config = smoke_config(data_dir, "train.eval_every_steps=100")
    workdir = str(tmp_path / "run")
    previous = signal.getsignal(signal.SIGTERM)
    result = train_and_evaluate(config, workdir)
    assert signal.getsignal(signal.SIGTERM) is previous
    assert result["preempted_at_step"] == 5 and not any(k.startswith("eval/") for k in result)
    out = capsys.readouterr().out
    assert "preempted at step 5; checkpoint saved, rerun the same command to resume" in out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")), key=int) == ["3", "5"]
    assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))
    assert max(r["step"] for r in read_metrics(workdir)) == 5  # step 5's partial interval

    poison(monkeypatch)
    final = train_and_evaluate(config, workdir)
    assert "Resuming from checkpoint at step 5" in capsys.readouterr().out
    assert "eval/validation/loss" in final and "preempted_at_step" not in final
    assert sorted(_losses(workdir)) == [2, 4, 5, 6]


def _cli_args(data_dir, workdir, *extra):
    return [
        sys.executable,
        "-m",
        "deepscale_jax.main",
        "--config=configs/lm.py:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={data_dir}",
        "--config.train.eval_every_steps=100000",
        *extra,
    ]


@pytest.mark.multiprocess  # ~30 s: two CLI launches
def test_cli_sigterm_exits_0_with_a_checkpoint_and_the_rerun_completes(data_dir, tmp_path):
    workdir = tmp_path / "run"
    args = _cli_args(
        data_dir,
        workdir,
        "--config.train.num_steps=300",
        "--config.train.log_every_steps=1",
        "--config.ckpt.every_steps=100",
    )
    proc, output = start_cli(args, str(workdir), until_step=3, log_dir=tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out, err = output()
    assert proc.returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("preempted at step"))
    step = int(line.split()[3].rstrip(";"))
    assert line == (f"preempted at step {step}; checkpoint saved, rerun the same command to resume")
    assert 3 <= step < 300
    assert str(step) in os.listdir(workdir / "checkpoints")
    assert max(r["step"] for r in read_metrics(str(workdir))) == step

    again = run_cli(args)
    assert f"Resuming from checkpoint at step {step}" in again.stdout
    assert "final validation" in again.stdout
    assert sorted(_losses(str(workdir))) == list(range(1, 301))


# --- 3. exact resume after a kill ------------------------------------------------------------


@pytest.mark.slow  # > 20 s: whole smoke runs (the default run keeps the step and stop tests)
def test_rerun_after_a_kill_ignores_unfinished_saves_and_rewrites_later_metrics(data_dir, tmp_path):
    config = smoke_config(
        data_dir, "train.log_every_steps=1", "train.eval_every_steps=100", "model.dropout=0.1"
    )
    straight = str(tmp_path / "straight")
    train_and_evaluate(config, straight)
    # The straight run as if killed during step 6's save: step 6 unfinished (orbax's temporary
    # name), metrics of steps 4..6 already written, the last line cut short.
    killed = str(tmp_path / "killed")
    shutil.copytree(straight, killed)
    ckpt_dir = os.path.join(killed, "checkpoints")
    os.rename(os.path.join(ckpt_dir, "6"), os.path.join(ckpt_dir, "6.orbax-checkpoint-tmp"))
    os.makedirs(os.path.join(ckpt_dir, "7.orbax-checkpoint-tmp-1712345678", "state"))
    with open(os.path.join(killed, "metrics.jsonl"), "a") as f:
        f.write('{"step": 7, "train/lo')
    train_and_evaluate(config, killed)
    assert sorted(os.listdir(ckpt_dir), key=int) == ["3", "6"]
    expected, resumed = _losses(straight), _losses(killed)
    assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert resumed[step] == expected[step], step


@pytest.mark.multiprocess  # ~40 s: three CLI launches
def test_cli_sigkill_then_rerun_gives_the_uninterrupted_losses(data_dir, tmp_path):
    extra = (
        "--config.train.num_steps=40",
        "--config.train.log_every_steps=1",
        "--config.ckpt.every_steps=2",
        "--config.model.dropout=0.1",
    )
    straight = tmp_path / "straight"
    run_cli(_cli_args(data_dir, straight, *extra))

    killed = tmp_path / "killed"
    args = _cli_args(data_dir, killed, *extra)
    proc, _ = start_cli(args, str(killed), until_step=15, log_dir=tmp_path)
    proc.kill()  # SIGKILL: no handler, a save may be in flight
    proc.wait(timeout=60)
    ckpt_dir = killed / "checkpoints"
    assert any(name.isdigit() for name in os.listdir(ckpt_dir))
    last = max(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
    assert last < 40
    # An unfinished save of a later step, as orbax leaves it (rerun must not load it).
    unfinished = ckpt_dir / f"{last + 2}.orbax-checkpoint-tmp"
    os.makedirs(unfinished / "state", exist_ok=True)

    again = run_cli(args)
    assert f"Removed unfinished checkpoint {unfinished}" in again.stdout
    assert f"Resuming from checkpoint at step {last}" in again.stdout
    assert not any("orbax-checkpoint-tmp" in n for n in os.listdir(ckpt_dir))
    expected, resumed = _losses(str(straight)), _losses(str(killed))
    assert sorted(expected) == sorted(resumed) == list(range(1, 41))
    for step in expected:
        assert resumed[step] == expected[step], step
