"""The device feed: global sharded batches, transferred ahead, with the consumed position as
its state (so a resumed run never skips the batches that were in flight)."""

import numpy as np
import pytest
from ml_collections import ConfigDict

from deepscale_jax import sharding
from deepscale_jax.data import make_lm_iterator
from deepscale_jax.data.device_feed import DeviceFeed


class Counting:
    """Batch i is {"x": [[i]] * 8}; the state is a mutable dict, as grain's can be."""

    def __init__(self):
        self.state = {"next": 0}

    def __next__(self):
        i = self.state["next"]
        self.state["next"] += 1
        return {"x": np.full((8, 1), i, np.int32)}

    def get_state(self):
        return self.state  # deliberately the live object: the feed must copy it

    def set_state(self, state):
        self.state = dict(state)


@pytest.fixture(scope="module")
def batch_sharding():
    return sharding.batch_sharding(sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_feed_keeps_order_and_reports_the_consumed_position(batch_sharding, depth):
    source = Counting()
    feed = DeviceFeed(source, batch_sharding, depth)
    assert feed.get_state() == {"next": 0}
    for i in range(5):
        batch = next(feed)
        assert batch["x"].sharding == batch_sharding and batch["x"].shape == (8, 1)
        np.testing.assert_array_equal(np.asarray(batch["x"]), i)
        assert feed.get_state() == {"next": i + 1}
        assert source.state["next"] == i + 1 + depth  # `depth` batches in flight

    feed.set_state({"next": 2})  # drops the in-flight batches
    np.testing.assert_array_equal(np.asarray(next(feed)["x"]), 2)
    assert feed.get_state() == {"next": 3}
    with pytest.raises(ValueError, match=r"train.prefetch_batches=-1 must be >= 0"):
        DeviceFeed(Counting(), batch_sharding, -1)


def test_resuming_a_prefetching_feed_on_the_real_pipeline_continues_exactly(
    batch_sharding, data_dir
):
    def source():
        return make_lm_iterator(
            ConfigDict({"name": "shakespeare", "data_dir": data_dir}),
            split="train",
            seq_len=32,
            global_batch_size=8,
            seed=0,
            shuffle=True,
            repeat=True,
            process_index=0,
            process_count=1,
        )

    feed = DeviceFeed(source(), batch_sharding, depth=2)
    for _ in range(3):
        next(feed)
    saved = feed.get_state()
    want = [np.asarray(next(feed)["inputs"]) for _ in range(2)]

    resumed = DeviceFeed(source(), batch_sharding, depth=2)
    resumed.set_state(saved)
    for expected in want:
        np.testing.assert_array_equal(np.asarray(next(resumed)["inputs"]), expected)
