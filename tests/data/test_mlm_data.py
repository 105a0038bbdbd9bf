"""MLM data: packing into padded rows, the 15% / 80-10-10 masking, determinism and resume."""

import json

import numpy as np
import pytest
from ml_collections import ConfigDict

from deepscale_jax.data import mlm, pipeline, shakespeare
from deepscale_jax.data.mlm import MASK_ID, PAD_ID, MaskingRates


@pytest.fixture(scope="module")
def config(data_dir):
    return ConfigDict({"name": "shakespeare", "data_dir": data_dir})


def make(config, **kwargs):
    args = dict(split="train", seq_len=64, global_batch_size=8, seed=0, shuffle=True)
    args.update(repeat=True, process_index=0, process_count=1)
    args.update(kwargs)
    return mlm.make_mlm_iterator(config, **args)


def test_packed_rows_reproduce_the_documents_in_order(data_dir):
    records = shakespeare.data_source("validation", data_dir)
    documents = [pipeline.encode_document(r) for r in records]
    rows = mlm.pack_rows(documents, 64)
    assert rows.dtype == np.int32 and rows.shape[1] == 64
    valid = rows != PAD_ID
    # Pads only at the end of a row; every row holds something.
    assert np.all(valid[:, 0])
    assert np.all(np.diff(valid.astype(int), axis=1) <= 0)
    np.testing.assert_array_equal(rows[valid], np.concatenate(documents))
    assert 0.6 < valid.mean() < 1.0  # paragraphs pack densely, yet padding is exercised


def test_paragraph_pieces_cut_after_blank_lines():
    doc = np.frombuffer(b"A:\nhi\n\nB:\nyo\n\n\nC", np.uint8).astype(np.int32)
    pieces = [bytes(p.astype(np.uint8)) for p in mlm.paragraph_pieces(doc, 5)]
    assert b"".join(pieces) == bytes(doc.astype(np.uint8))
    assert pieces == [b"A:\nhi", b"\n\n", b"B:\nyo", b"\n\n", b"\n", b"C"]


def test_masking_statistics():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (4000, 64), dtype=np.int32)
    tokens[:, 48:] = PAD_ID
    out = [mlm.mask_row(t, np.random.default_rng(i), MaskingRates()) for i, t in enumerate(tokens)]
    inputs = np.stack([o["inputs"] for o in out])
    weights = np.stack([o["weights"] for o in out])
    valid = np.stack([o["valid"] for o in out])
    np.testing.assert_array_equal(np.stack([o["targets"] for o in out]), tokens)
    np.testing.assert_array_equal(valid, tokens != PAD_ID)
    selected = weights > 0
    assert not np.any(selected & ~valid)  # pads are never selected
    assert abs(selected[valid].mean() - 0.15) < 0.005
    masked = inputs[selected] == MASK_ID
    kept = inputs[selected] == tokens[selected]
    replaced = ~masked & ~kept
    assert abs(masked.mean() - 0.8) < 0.01
    # A random replacement equals the original 1/256 of the time: 10% + 10%/256 kept.
    assert abs(kept.mean() - (0.1 + 0.1 / 256)) < 0.01
    assert abs(replaced.mean() - 0.1 * 255 / 256) < 0.01
    assert np.all(inputs[selected][replaced] < 256)
    np.testing.assert_array_equal(inputs[~selected], tokens[~selected])  # unselected untouched


def test_batches_are_typed_seeded_and_vary_by_epoch(config):
    batch = next(make(config))
    assert set(batch) == {"inputs", "targets", "weights", "valid"}
    for key, dtype in [("inputs", np.int32), ("targets", np.int32), ("weights", np.float32)]:
        assert batch[key].shape == (8, 64) and batch[key].dtype == dtype
    assert batch["valid"].dtype == bool
    again = next(make(config))
    for key in batch:
        np.testing.assert_array_equal(batch[key], again[key])
    other = next(make(config, seed=1))
    assert not np.array_equal(batch["inputs"], other["inputs"])
    # Evaluation masks the same positions on every pass.
    a = next(make(config, split="validation", shuffle=False, repeat=False))
    b = next(make(config, split="validation", shuffle=False, repeat=False))
    np.testing.assert_array_equal(a["weights"], b["weights"])


def test_the_same_row_is_masked_anew_each_epoch(config):
    rows = len(mlm.split_rows(config, "validation", 64))
    size = max(d for d in range(1, 200) if rows % d == 0)  # batches that tile one epoch
    it = make(config, split="validation", global_batch_size=size, shuffle=False)
    first = next(it)
    for _ in range(rows // size - 1):
        next(it)
    second = next(it)
    np.testing.assert_array_equal(second["targets"], first["targets"])
    assert not np.array_equal(second["weights"], first["weights"])


@pytest.mark.parametrize("kwargs", [dict(), dict(process_index=1, process_count=2)])
def test_resume_matches_uninterrupted(config, kwargs):
    it = make(config, **kwargs)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(3)]
    resumed = make(config, **kwargs)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_unigram_baseline_is_a_distribution_over_bytes(config):
    log_probs = mlm.unigram_log_probs(config, 64)
    assert log_probs.shape == (mlm.VOCAB_SIZE,)
    assert np.isneginf(log_probs[PAD_ID]) and np.isneginf(log_probs[MASK_ID])
    np.testing.assert_allclose(np.exp(log_probs[:256]).sum(), 1.0, rtol=1e-5)
    assert int(np.argmax(log_probs)) == ord(" ")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mask_rate", 0.0, r"data.mask_rate=0.0 must lie in \(0, 1\]"),
        ("mask_token_rate", 0.95, r"data.mask_token_rate=0.95 and data.random_token_rate"),
    ],
)
def test_bad_masking_rates(config, field, value, message):
    bad = ConfigDict({**config.to_dict(), field: value})
    with pytest.raises(ValueError, match=message):
        mlm.masking_rates(bad)
