"""Checkpoint compatibility: stored metadata, the mismatch check, restores on another device count
or mesh (subprocesses: the device count is fixed per process), and the scan-layout converter."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import lm
from deepscale_jax import convert, sharding
from deepscale_jax.checkpoint import (
    Checkpointer,
    abstract_state,
    check_compatible,
    checkpoint_metadata,
)
from deepscale_jax.nn.stack import unstack_layers
from deepscale_jax.optim import make_optimizer
from deepscale_jax.tasks import build_task
from deepscale_jax.train import create_train_state
from deepscale_jax.validation import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH_8 = {"data": 4, "fsdp": 2, "tensor": 1}


def tiny_config(*extra: str):
    return lm.get_config(",".join(["smoke", *extra]))


_BUILT: dict = {}


def build_state(config, mesh_shape, seed=0):
    """(task, a TrainState on the mesh with every float leaf random, its shardings, the mesh):
    random optimizer moments, so a permuted or dropped mu/nu leaf cannot go unnoticed. Cached
    per (config, mesh): building jits the model's init, seconds on a busy CPU."""
    key = (config.to_json(), json.dumps(mesh_shape, sort_keys=True), seed)
    if key not in _BUILT:
        _BUILT[key] = _build_state(config, mesh_shape, seed)
    return _BUILT[key]


def _build_state(config, mesh_shape, seed):
    model_cfg, scheme = validate_config(config)
    task = build_task(config, model_cfg, scheme)
    mesh = sharding.make_mesh(mesh_shape)
    tx = make_optimizer(config.optim, config.train.num_steps)
    state, shardings = create_train_state(
        task.model, tx, mesh, sharding.DEFAULT_RULES, seed, task.init_inputs()
    )

    rng = np.random.default_rng(seed + 1)
    leaves, treedef = jax.tree.flatten(state)
    random = [
        rng.standard_normal(x.shape).astype(x.dtype) if np.issubdtype(x.dtype, np.floating) else x
        for x in leaves
    ]
    state = jax.tree.unflatten(treedef, random).replace(step=np.int32(7))
    state = jax.device_put(state, shardings)
    return task, state, shardings, mesh


def flat_numpy(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf))
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def save(config, directory, mesh_shape=MESH_8, metadata=True):
    task, state, _, mesh = build_state(config, mesh_shape)
    meta = checkpoint_metadata(config, mesh) if metadata else None
    ckpt = Checkpointer(directory, 1, 2, metadata=meta)
    ckpt.save(int(state.step), state, {"position": 3})
    ckpt.close()
    return task, state, mesh


def restore(config, directory, mesh_shape):
    task, state, shardings, mesh = build_state(config, mesh_shape)
    ckpt = Checkpointer(directory, 1, 2, metadata=checkpoint_metadata(config, mesh))
    try:
        restored, data = ckpt.restore(ckpt.latest_step(), abstract_state(state, shardings))
    finally:
        ckpt.close()
    return task, restored, shardings, data


def test_mismatch_names_every_field_and_allowed_changes_pass():
    saved = checkpoint_metadata(tiny_config())
    assert saved["model"]["d_model"] == 32 and saved["model"]["scan_layers"] is True
    assert saved["scheme"] == {"name": "xavier"}
    shape = {"data": 8, "fsdp": 1, "tensor": 1}
    assert saved["mesh"] == {"shape": shape, "devices": 8, "processes": 1}
    assert saved["jax_version"] == jax.__version__

    bad = checkpoint_metadata(
        tiny_config(
            "d_model=64", "norm=rms_norm", "scan=false", "scheme=default", "model.dropout=0.1"
        )
    )
    with pytest.raises(ValueError) as err:
        check_compatible(saved, bad, "/ck", 6)
    message = str(err.value)
    for line in (
        "checkpoint /ck step 6 does not fit the config",
        "model.d_model: checkpoint 32, config 64",
        "model.norm: checkpoint 'layer_norm', config 'rms_norm'",
        "model.scan_layers: checkpoint True, config False",
        "scheme.name: checkpoint 'xavier', config 'default'",
        "python -m deepscale_jax.convert --from=/ck --to=NEW_WORKDIR/checkpoints "
        "--scan_layers=false",
    ):
        assert line in message, message
    assert "dropout" not in message  # allowed to differ

    moved = checkpoint_metadata(tiny_config("steps=12", "model.dropout=0.1")) | {
        "mesh": {"shape": {"data": 2, "fsdp": 2, "tensor": 1}, "devices": 4},
        "jax_version": "9.9.9",
    }
    note = check_compatible(saved, moved, "/ck", 6)
    assert note.startswith("checkpoint /ck step 6: changed (allowed): ")
    for part in (
        "mesh.devices: checkpoint 8, now 4",
        "mesh.shape: checkpoint {'data': 8, 'fsdp': 1, 'tensor': 1}, now {'data': 2,",
        "jax_version: checkpoint",
        "train.num_steps: checkpoint 6, now 12",
        "model.dropout: checkpoint 0.0, now 0.1",
        "unchecked: mesh.processes (not in the config)",
    ):
        assert part in note, note
    assert "\n" not in note
    assert check_compatible(saved, saved) is None
    # A scheme option is compared when it is the chosen scheme's.
    dslm = checkpoint_metadata(tiny_config("scheme=dslm"))
    with pytest.raises(ValueError, match=r"scheme\.k: checkpoint 2\.0, config 4\.0"):
        check_compatible(dslm, checkpoint_metadata(tiny_config("scheme=dslm", "scheme.k=4")))


def test_convert_tree_round_trip_and_errors():
    layers = {"attn": {"kernel": np.arange(24.0).reshape(3, 2, 4)}, "scale": np.ones((3, 2))}
    params = {"decoder": {"layers": layers}, "embed": {"embedding": np.zeros((5, 2))}}
    tree = {"params": params, "opt_state": [None, [{"mu": params, "count": np.int32(4)}]]}
    unrolled, stacks = convert.convert_tree(tree, scan_layers=False)
    assert stacks == ["/params/decoder", "/opt_state/1/0/mu/decoder"]
    layer_2 = unrolled["opt_state"][1][0]["mu"]["decoder"]["layer_002"]
    np.testing.assert_array_equal(layer_2["attn"]["kernel"], layers["attn"]["kernel"][2])
    assert sorted(unrolled["params"]["decoder"]) == ["layer_000", "layer_001", "layer_002"]
    assert unrolled["opt_state"][0] is None and unrolled["opt_state"][1][0]["count"] == 4
    back, _ = convert.convert_tree(unrolled, scan_layers=True)
    flat = lambda t: {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(t)}
    assert flat(back).keys() == flat(tree).keys()
    for name, value in flat(tree).items():
        np.testing.assert_array_equal(flat(back)[name], value, err_msg=name)
    with pytest.raises(ValueError, match="/params/decoder is already scanned"):
        convert.convert_tree(tree, scan_layers=True)
    ragged = {"layers": {"a": np.zeros((3, 2)), "b": np.zeros((2, 2))}}
    with pytest.raises(ValueError, match="disagree on the layer axis"):
        convert.convert_tree({"decoder": ragged}, scan_layers=False)
    with pytest.raises(ValueError, match="not numbered 0..N-1"):
        convert.convert_tree({"decoder": {"layer_000": {}, "layer_002": {}}}, scan_layers=True)


def test_checkpointer_checks_before_restoring(tmp_path, caplog):
    directory = str(tmp_path / "ck")
    config = tiny_config()
    _, state, _ = save(config, directory)
    with open(os.path.join(directory, "7", "metadata", "metadata")) as f:
        assert json.load(f)["model"]["num_layers"] == 2

    # The check runs before the target is looked at (so a bad config fails fast).
    deeper = Checkpointer(directory, 1, 2, metadata=checkpoint_metadata(tiny_config("layers=3")))
    with pytest.raises(ValueError, match="model.num_layers: checkpoint 2, config 3"):
        deeper.restore(7, abstract_state=None)
    deeper.close()
    # Allowed changes (steps, dropout) restore, with one logged line (other meshes and device
    # counts: the subprocess test below).
    _, target, shardings, mesh = build_state(config, MESH_8)
    longer = tiny_config("steps=20", "model.dropout=0.1")
    ckpt = Checkpointer(directory, 1, 2, metadata=checkpoint_metadata(longer, mesh))
    with caplog.at_level(logging.WARNING):
        restored, data = ckpt.restore(7, abstract_state(target, shardings))
    ckpt.close()
    lines = [r.getMessage() for r in caplog.records if "changed (allowed)" in r.getMessage()]
    assert len(lines) == 1, lines
    assert (
        "model.dropout: checkpoint 0.0, now 0.1; train.num_steps: checkpoint 6, now 20"
        in (lines[0])
    )
    assert data == {"position": 3}
    expected = flat_numpy(state)
    for name, value in flat_numpy(restored).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)

    # A checkpoint without metadata (written before it existed) restores with a warning.
    old = str(tmp_path / "old")
    save(config, old, metadata=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        restore(config, old, MESH_8)
    assert any("has no metadata" in r.getMessage() for r in caplog.records)


def _restore_main(directory: str, mesh_json: str, out: str) -> None:
    """Subprocess body: restore `directory` on this process's devices and mesh, save leaves."""
    _, restored, shardings, _ = restore(tiny_config(), directory, json.loads(mesh_json))
    for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings), strict=True):
        assert leaf.sharding == want, (leaf.sharding, want)
    np.savez(out, **flat_numpy(restored))


@pytest.mark.multiprocess  # ~30 s: two subprocesses
def test_restore_on_other_device_counts_and_meshes(tmp_path):
    directory = str(tmp_path / "ck")
    _, state, _ = save(tiny_config(), directory)
    expected = flat_numpy(state)
    runs = {}
    for count, mesh in ((4, {"data": 1, "fsdp": 2, "tensor": 2}), (1, {"data": 1})):
        out = str(tmp_path / f"restored_{count}.npz")
        env = {
            **os.environ,
            "PYTHONPATH": ROOT,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}",
        }
        code = (
            "import sys; from tests.test_checkpoint_compat import _restore_main; "
            "_restore_main(*sys.argv[1:])"
        )
        args = [sys.executable, "-c", code, directory, json.dumps(mesh), out]
        runs[count] = (out, subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE))
    for count, (out, proc) in runs.items():
        _, stderr = proc.communicate(timeout=300)
        stderr = stderr.decode()
        assert proc.returncode == 0, stderr[-3000:]
        assert f"mesh.devices: checkpoint 8, now {count}" in stderr, stderr[-3000:]
        with np.load(out) as restored:
            assert sorted(restored.files) == sorted(expected)
            for name, want in expected.items():
                np.testing.assert_array_equal(restored[name], want, err_msg=f"{count}: {name}")


def test_convert_scanned_to_unrolled_and_back(tmp_path):
    scanned_cfg, unrolled_cfg = tiny_config(), tiny_config("scan=false")
    src, mid, back = (str(tmp_path / name) for name in ("scanned", "unrolled", "back"))
    task, state, _ = save(scanned_cfg, src)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 32), 0, 256)
    logits = task.model.apply({"params": state.params}, tokens)

    convert.main([f"--from={src}", f"--to={mid}", "--scan_layers=false"])
    scanned_ckpt = Checkpointer(mid, 1, 2, metadata=checkpoint_metadata(scanned_cfg))
    with pytest.raises(ValueError, match="model.scan_layers: checkpoint False, config True"):
        scanned_ckpt.restore(7, abstract_state=None)
    scanned_ckpt.close()
    unrolled_task, unrolled, _, data = restore(unrolled_cfg, mid, MESH_8)
    assert data == {"position": 3}
    assert "layer_001" in unrolled.params["decoder"]
    mu = unrolled.opt_state[1][0].mu["decoder"]["layer_001"]["attn"]["q"]["kernel"]
    want = state.opt_state[1][0].mu["decoder"]["layers"]["attn"]["q"]["kernel"][1]
    np.testing.assert_array_equal(np.asarray(mu), np.asarray(want))
    # The converted parameters are exactly the unstacked ones: identical logits ...
    reference = {**state.params, "decoder": unstack_layers(state.params["decoder"], 2)}
    unrolled_logits = unrolled_task.model.apply({"params": unrolled.params}, tokens)
    np.testing.assert_array_equal(
        unrolled_logits, unrolled_task.model.apply({"params": reference}, tokens)
    )
    # ... and the same function as the scanned model (up to float reassociation; the random
    # N(0, 1) weights make logits of order 10).
    np.testing.assert_allclose(unrolled_logits, logits, rtol=1e-4, atol=1e-4)

    assert convert.convert_checkpoint(mid, back, scan_layers=True) == int(state.step)
    with open(os.path.join(back, "7", "metadata", "metadata")) as f:
        metadata = json.load(f)
    assert metadata["model"]["scan_layers"] is True
    assert metadata["converted_from"]["scan_layers"] is False
    _, again, _, _ = restore(scanned_cfg, back, MESH_8)
    expected = flat_numpy(state)
    for name, value in flat_numpy(again).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    with pytest.raises(ValueError, match="already scanned"):
        convert.convert_checkpoint(back, str(tmp_path / "again"), scan_layers=True)
