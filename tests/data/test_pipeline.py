"""The grain LM pipeline on the real Shakespeare corpus."""

import json

import numpy as np
import pytest
from ml_collections import ConfigDict

from deepscale_jax.data import (
    ByteTokenizer,
    lm_vocab_size,
    make_lm_iterator,
    pipeline,
    shakespeare,
)

TOKENIZER = ByteTokenizer()


@pytest.fixture(scope="session")
def config(data_dir):
    return ConfigDict({"name": "shakespeare", "data_dir": data_dir})


@pytest.fixture(scope="session")
def validation_stream(data_dir):
    """The validation token stream, rebuilt here from the data source."""
    records = shakespeare.data_source("validation", data_dir)
    return np.concatenate([pipeline.encode_document(r) for r in records])


def make(config, **kwargs):
    args = dict(split="train", seq_len=64, global_batch_size=8, seed=0, shuffle=True)
    args.update(repeat=True, process_index=0, process_count=1)
    args.update(kwargs)
    return make_lm_iterator(config, **args)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])


def test_tokenizer_roundtrip():
    text = "O Romeo, Romeo! — wherefore art thou?"
    ids = TOKENIZER.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert TOKENIZER.decode(ids) == text
    assert TOKENIZER.decode([0xE2, 0x80]) == "\ufffd"
    with pytest.raises(ValueError, match=r"byte ids must lie in \[0, 256\)"):
        TOKENIZER.decode([256])


def test_vocab_size(config):
    assert lm_vocab_size(config) == 256


def test_windows_shift_shape_dtype(config):
    batch = next(make(config, seq_len=128, global_batch_size=4))
    assert set(batch) == {"inputs", "targets"}
    for x in batch.values():
        assert x.shape == (4, 128) and x.dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_windows_are_shakespeare(config, validation_stream):
    it = make(config, split="validation", seq_len=256, shuffle=False, repeat=False)
    batch = next(it)
    text = TOKENIZER.decode(batch["inputs"][0])
    np.testing.assert_array_equal(batch["inputs"][0], validation_stream[:256])
    assert text.split("\n")[0] in {"Twelfth Night", "Richard II", "Othello"}
    assert "ACT I" in text and ":\n" in text
    # Stride seq_len: each row's last target is the next row's first input.
    np.testing.assert_array_equal(batch["targets"][:-1, -1], batch["inputs"][1:, 0])


def test_eval_pass_is_finite_unshuffled_and_covers_split(config, validation_stream):
    seq_len, batch_size = 512, 16
    kwargs = dict(split="validation", seq_len=seq_len, global_batch_size=batch_size)
    batches = list(make(config, shuffle=False, repeat=False, **kwargs))
    windows = pipeline.num_windows(len(validation_stream), seq_len)
    assert len(batches) == windows // batch_size  # last incomplete batch dropped
    inputs = np.concatenate([b["inputs"] for b in batches]).reshape(-1)
    np.testing.assert_array_equal(inputs, validation_stream[: len(inputs)])


def test_same_seed_same_batches_other_seed_differs(config):
    a = take(make(config, seed=3), 4)
    assert_same_batches(a, take(make(config, seed=3), 4))
    b = take(make(config, seed=4), 4)
    assert not np.array_equal(a[0]["inputs"], b[0]["inputs"])


def test_epochs_are_reshuffled(config, validation_stream):
    seq_len = 2048
    windows = pipeline.num_windows(len(validation_stream), seq_len)
    it = make(config, split="validation", seq_len=seq_len, global_batch_size=1)
    rows = np.concatenate([b["inputs"] for b in take(it, 2 * windows)])
    epoch0, epoch1 = rows[:windows], rows[windows:]
    expected = {tuple(validation_stream[k * seq_len : k * seq_len + 8]) for k in range(windows)}
    assert {tuple(r[:8]) for r in epoch0} == expected == {tuple(r[:8]) for r in epoch1}
    assert not np.array_equal(epoch0, epoch1)


def test_process_shards_are_disjoint_and_make_the_global_batch(config):
    global_batches = take(make(config, global_batch_size=8), 3)
    shards = [
        take(make(config, global_batch_size=8, process_index=p, process_count=4), 3)
        for p in range(4)
    ]
    for step, global_batch in enumerate(global_batches):
        parts = [shard[step]["inputs"] for shard in shards]
        assert all(part.shape == (2, 64) for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), global_batch["inputs"])
        rows = {row.tobytes() for part in parts for row in part}
        assert len(rows) == 8


def test_default_process_is_this_jax_process(config):
    kwargs = dict(split="validation", seq_len=32, global_batch_size=8, seed=0)
    batch = next(make_lm_iterator(config, shuffle=True, repeat=True, **kwargs))
    assert batch["inputs"].shape == (8, 32)  # jax.process_count() == 1 here


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(process_index=2, process_count=4),
        dict(split="validation", shuffle=False, repeat=False, global_batch_size=16),
        dict(split="validation", seq_len=4096, global_batch_size=3),  # crosses epochs
    ],
)
def test_checkpoint_resume_matches_uninterrupted(config, kwargs):
    it = make(config, **kwargs)
    take(it, 40)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 5)
    resumed = make(config, **kwargs)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 5), expected)


def test_streaming_windows_equal_in_memory_windows(config, monkeypatch):
    streaming = pipeline.Corpus(shakespeare.SPLITS, shakespeare.data_source, streaming=True)
    monkeypatch.setitem(pipeline.CORPORA, "shakespeare_streamed", streaming)
    streamed = ConfigDict({"name": "shakespeare_streamed", "data_dir": config.data_dir})
    kwargs = dict(split="validation", seq_len=1000, shuffle=False, repeat=False)
    assert_same_batches(list(make(streamed, **kwargs)), list(make(config, **kwargs)))
    # Resume in the middle of a play (the state's offset is inside a document).
    it = make(streamed, **kwargs)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))
    assert state["offset"] > 0
    resumed = make(streamed, **kwargs)
    resumed.set_state(state)
    assert_same_batches(list(resumed), list(it))


def test_unknown_name(config):
    bad = ConfigDict({"name": "tiny_shakespeare", "data_dir": config.data_dir})
    with pytest.raises(ValueError, match=r"data\.name='tiny_shakespeare'; accepted: lm1b, shak"):
        make(bad)
    with pytest.raises(ValueError, match=r"data\.name='tiny_shakespeare'"):
        lm_vocab_size(bad)


def test_unknown_split(config):
    with pytest.raises(ValueError, match=r"split='test'.*\['train', 'validation'\]"):
        make(config, split="test")


def test_seq_len_longer_than_split(config, validation_stream):
    n = len(validation_stream)
    with pytest.raises(ValueError, match=rf"seq_len={n}.*{n} tokens.*seq_len <= {n - 1}"):
        make(config, split="validation", seq_len=n)
    next(make(config, split="validation", seq_len=n - 1, global_batch_size=1))


def test_global_batch_not_divisible(config):
    with pytest.raises(ValueError, match=r"global_batch_size=10.*process_count=4"):
        make(config, global_batch_size=10, process_index=0, process_count=4)


def test_eval_batch_larger_than_split(config):
    message = r"train.batch_size=1000 is larger than the 1 windows of split=.validation."
    with pytest.raises(ValueError, match=message):
        make(config, split="validation", seq_len=200_000, global_batch_size=1000, repeat=False)


def test_bad_process_index_and_sizes(config):
    with pytest.raises(ValueError, match=r"process_index=4 must lie in \[0, process_count=4\)"):
        make(config, process_index=4, process_count=4)
    with pytest.raises(ValueError, match=r"seq_len=0 must be >= 1"):
        make(config, seq_len=0)
    with pytest.raises(ValueError, match=r"global_batch_size=0 must be >= 1"):
        make(config, global_batch_size=0)
