"""lm1b through the real TFDS builder, with `tfds.testing.mock_data` (USE_CODE).

`mock_data` patches `tfds.data_source` itself: inside the context, `tfds.data_source('lm1b',
split=...)` returns an ArrayRecord-like source of random `{'text': str}` records generated
from the builder's feature spec (deterministic; slicing like 'test[:5]' is ignored).
"""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from deepscale_jax.data import ByteTokenizer, make_lm_iterator, pipeline

NUM_EXAMPLES = 64
TOKENIZER = ByteTokenizer()


@pytest.fixture
def config():
    """An lm1b config whose reads are served by mock data for the test's duration."""
    with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
        yield ConfigDict({"name": "lm1b", "data_dir": None})


def make(config, **kwargs):
    args = dict(split="train", seq_len=16, global_batch_size=4, seed=0, shuffle=True)
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


def test_mock_source_is_random_access_text(config):
    source = tfds.data_source("lm1b", split="test")
    assert len(source) == NUM_EXAMPLES
    assert isinstance(source[3]["text"], str)
    again = tfds.data_source("lm1b", split="test")
    assert [r["text"] for r in source] == [r["text"] for r in again]


def test_eval_pass_covers_the_sentence_stream(config):
    records = tfds.data_source("lm1b", split="test")
    stream = np.concatenate([pipeline.encode_document(r) for r in records])
    batches = list(make(config, split="test", shuffle=False, repeat=False))
    assert len(batches) == pipeline.num_windows(len(stream), 16) // 4
    for b in batches:
        assert b["inputs"].shape == b["targets"].shape == (4, 16)
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    inputs = np.concatenate([b["inputs"] for b in batches]).reshape(-1)
    np.testing.assert_array_equal(inputs, stream[: len(inputs)])
    text = TOKENIZER.decode(inputs)
    assert text.startswith(records[0]["text"] + "\n" + records[1]["text"])


def test_training_is_seeded_and_sharded(config):
    a = take(make(config, seed=1), 30)  # past one epoch of ~70 windows
    assert_same_batches(a, take(make(config, seed=1), 30))
    assert not np.array_equal(a[0]["inputs"], next(make(config, seed=2))["inputs"])
    shards = [take(make(config, seed=1, process_index=p, process_count=2), 30) for p in range(2)]
    for step, batch in enumerate(a):
        parts = [shard[step]["inputs"] for shard in shards]
        assert all(part.shape == (2, 16) for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), batch["inputs"])


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(process_index=1, process_count=2), dict(split="test", shuffle=False)],
)
def test_checkpoint_resume_matches_uninterrupted(config, kwargs):
    it = make(config, **kwargs)
    take(it, 23)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 25)
    resumed = make(config, **kwargs)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 25), expected)


def test_unknown_split(config):
    with pytest.raises(ValueError, match=r"split='validation'.*'lm1b'.*\['train', 'test'\]"):
        make(config, split="validation")


def test_seq_len_longer_than_split(config):
    with pytest.raises(ValueError, match=r"seq_len=100000 .*split='test'.* tokens"):
        make(config, split="test", seq_len=100_000)


def test_empty_split():
    with tfds.testing.mock_data(num_examples=0, policy=tfds.testing.MockPolicy.USE_CODE):
        config = ConfigDict({"name": "lm1b", "data_dir": None})
        with pytest.raises(ValueError, match=r"split='train' of data.name='lm1b' is empty"):
            make(config)


def test_not_prepared_says_how_to_prepare(tmp_path):
    config = ConfigDict({"name": "lm1b", "data_dir": str(tmp_path)})
    with pytest.raises(RuntimeError, match=r"lm1b is not prepared.*tfds build lm1b"):
        make(config)
