"""The training loop: sharded == single device, resumed == uninterrupted, outputs on disk."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import lm, mlm, seq2seq, vit
from deepscale_jax import sharding
from deepscale_jax.data.device_feed import to_global
from deepscale_jax.metrics import read_metrics
from deepscale_jax.optim import make_optimizer, make_schedule
from deepscale_jax.tasks import build_task
from deepscale_jax.train import create_train_state, jit_train_step, train_and_evaluate
from deepscale_jax.validation import validate_config


def smoke_config(data_dir, *extra):
    config = lm.get_config(",".join(["smoke", *extra]))
    config.data.data_dir = data_dir
    return config


def _one_step(config, mesh_shape, devices, batch):
    model_cfg, scheme = validate_config(config)
    task = build_task(config, model_cfg, scheme)
    mesh = sharding.make_mesh(mesh_shape, devices)
    tx = make_optimizer(config.optim, config.train.num_steps)
    state, shardings = create_train_state(
        task.model, tx, mesh, sharding.DEFAULT_RULES, seed=0, init_inputs=task.init_inputs()
    )
    batch_sharding = sharding.batch_sharding(mesh)
    step = jit_train_step(task, tx, make_schedule(config.optim, 10), shardings, batch_sharding)
    for _ in range(2):
        state, metrics = step(state, to_global(batch, batch_sharding))
    return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_sharded_step_equals_single_device_step(data_dir, scan):
    config = smoke_config(data_dir, f"scan={scan}", "model.dropout=0.0")
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 256, (8, 32), dtype=np.int32)
    batch = {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1)}
    single_params, single = _one_step(config, {"data": 1}, jax.devices()[:1], batch)
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    sharded_params, sharded = _one_step(config, mesh, jax.devices(), batch)
    np.testing.assert_allclose(sharded["train/loss"], single["train/loss"], rtol=1e-6)
    np.testing.assert_allclose(sharded["train/grad_norm"], single["train/grad_norm"], rtol=1e-5)
    flat_single = dict(jax.tree_util.tree_flatten_with_path(single_params)[0])
    for path, a in jax.tree_util.tree_flatten_with_path(sharded_params)[0]:
        name = jax.tree_util.keystr(path)
        if "['k']['bias']" in name:
            # The key bias has an exactly-zero gradient (softmax is shift-invariant per query);
            # Adam normalises its rounding noise to +-lr, so both runs hold noise there.
            continue
        np.testing.assert_allclose(a, flat_single[path], rtol=1e-5, atol=1e-6, err_msg=name)


def _losses(workdir):
    return {r["step"]: r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r}


@pytest.mark.slow  # ~35 s; CI runs the SIGKILL version (tests/test_reliability.py)
def test_resumed_run_equals_uninterrupted_run(data_dir, tmp_path):
    config = smoke_config(data_dir, "train.log_every_steps=1", "model.dropout=0.1")
    straight = str(tmp_path / "straight")
    train_and_evaluate(config, straight)

    interrupted = str(tmp_path / "interrupted")
    train_and_evaluate(config, interrupted)
    # Simulate a run killed after the step-3 checkpoint: drop the later checkpoint and metrics.
    shutil.rmtree(os.path.join(interrupted, "checkpoints", "6"))
    records = [r for r in read_metrics(interrupted) if r["step"] <= 3]
    with open(os.path.join(interrupted, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    train_and_evaluate(config, interrupted)

    expected, resumed = _losses(straight), _losses(interrupted)
    assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert resumed[step] == expected[step], step


def test_run_writes_config_metrics_checkpoints_and_learns(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    config = smoke_config(data_dir, "steps=12", "lr=3e-3")
    final = train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["num_layers"] == 2
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "9"]
    records = read_metrics(workdir)
    losses = [r["train/loss"] for r in records if "train/loss" in r]
    assert losses[-1] < losses[0] - 0.5
    assert final["eval/validation/bits_per_byte"] < 8.0
    assert {"train/grad_norm", "perf/tokens_per_sec"} <= set(final)
    assert os.listdir(os.path.join(workdir, "tensorboard"))

    # A rerun of a finished run resumes at its last step and only evaluates.
    again = train_and_evaluate(config, workdir)
    assert again["eval/validation/loss"] == pytest.approx(final["eval/validation/loss"])


def test_missing_workdir_parent_is_an_error_before_any_work(data_dir, tmp_path):
    with pytest.raises(ValueError, match="parent directory"):
        train_and_evaluate(smoke_config(data_dir), str(tmp_path / "a" / "b"))


def task_config(task, data_dir, *extra):
    module = {"mlm": mlm, "vit": vit, "seq2seq": seq2seq}[task]
    config = module.get_config(",".join(["smoke", *extra]))
    config.data.data_dir = data_dir
    return config


@pytest.mark.parametrize(
    "task",
    [
        "mlm",
        # ~30 s each; their pipelines' exact resume is tested in tests/data, the loop's by mlm/lm
        pytest.param("vit", marks=pytest.mark.slow),
        pytest.param("seq2seq", marks=pytest.mark.slow),
    ],
)
def test_task_smoke_trains_on_8_devices_and_resumes_exactly(task, data_dir, tmp_path):
    """Two steps, a checkpoint, two more; a run killed after the first checkpoint and rerun
    gives the uninterrupted run's losses (params, optimizer, rng and data position restored)."""
    assert jax.device_count() == 8
    config = task_config(
        task,
        data_dir,
        "steps=4",
        "ckpt.every_steps=2",
        "train.log_every_steps=1",
        "train.eval_every_steps=2",
        "model.dropout=0.1",
    )
    straight = str(tmp_path / "straight")
    final = train_and_evaluate(config, straight)
    assert sorted(os.listdir(os.path.join(straight, "checkpoints"))) == ["2", "4"]
    interrupted = str(tmp_path / "interrupted")  # the straight run as if killed after step 2
    shutil.copytree(straight, interrupted)
    shutil.rmtree(os.path.join(interrupted, "checkpoints", "4"))
    records = [r for r in read_metrics(interrupted) if r["step"] <= 2]
    with open(os.path.join(interrupted, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    resumed = train_and_evaluate(config, interrupted)
    expected, got = _losses(straight), _losses(interrupted)
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4]
    for step in expected:
        assert got[step] == expected[step], step
    assert resumed["eval/validation/accuracy"] == final["eval/validation/accuracy"]
    unit = "examples" if task == "vit" else "tokens"
    assert f"perf/{unit}_per_sec" in final
    if task == "mlm":
        assert {"unigram_accuracy", "unigram_loss", "loss"} <= {
            k.split("/")[-1] for k in final if k.startswith("eval/validation/")
        }
    else:
        assert "eval/test/accuracy" in final
    if task == "seq2seq":
        assert {"eval/test/bleu", "eval/test/exact_match"} <= set(final)
        assert resumed["eval/test/bleu"] == final["eval/test/bleu"]


@pytest.mark.parametrize(
    ("task", "arg", "message"),
    [
        ("mlm", "model.vocab_size=256", r"model.vocab_size=256 must be 258 for the MLM"),
        ("mlm", "model.architecture=decoder_only", r"encoder-only"),
        ("vit", "vit.patch_size=3", r"vit.patch_size=3 does not divide the image size 8"),
        ("vit", "model.max_len=4", r"model.max_len=4 is smaller than the 17 tokens"),
        ("vit", "data.name=mnist", r"unknown data.name='mnist'"),
    ],
)
def test_bad_task_config_names_the_field(task, arg, message, data_dir, tmp_path):
    config = task_config(task, data_dir, arg)
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_mlm_beats_the_unigram_baseline_in_a_short_run(data_dir, tmp_path):
    config = task_config(
        "mlm",
        data_dir,
        "steps=200",
        "layers=2",
        "width=64",
        "model.d_ff=256",
        "lr=3e-3",
        "optim.warmup_steps=20",
        "train.batch_size=16",
        "train.eval_every_steps=200",
        "train.eval_batches=8",
        "ckpt.every_steps=200",
    )
    final = train_and_evaluate(config, str(tmp_path / "run"))
    accuracy = final["eval/validation/accuracy"]
    assert accuracy > final["eval/validation/unigram_accuracy"] + 0.05
    assert final["eval/validation/loss"] < final["eval/validation/unigram_loss"]
