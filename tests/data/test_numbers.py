"""German -> English number-word data: splits disjoint by number, examples, resumable state."""

import ml_collections
import numpy as np

from deepscale_jax.data import numbers


def config(**kw):
    return ml_collections.ConfigDict({"name": "numbers", **numbers.DEFAULTS, **kw})


def test_splits_are_disjoint_by_number_and_fixed():
    cfg = config(max_number=9999, validation_size=500, test_size=500)
    splits = {s: numbers.split_numbers(cfg, s) for s in numbers.SPLITS}
    assert len(splits["validation"]) == len(splits["test"]) == 500
    assert sum(len(v) for v in splits.values()) == 10000
    sets = {s: set(v.tolist()) for s, v in splits.items()}
    assert not sets["train"] & sets["test"]
    assert not sets["train"] & sets["validation"]
    assert not sets["validation"] & sets["test"]
    again = numbers._split_numbers.__wrapped__(9999, 0, 500, 500, 0)
    np.testing.assert_array_equal(again["test"], splits["test"])


def test_example_layout():
    ex = numbers.make_example(21, 20, 16)
    assert numbers.VOCAB.decode(ex["inputs"]) == "einundzwanzig"
    assert numbers.VOCAB.decode(ex["targets"]) == "twenty-one"
    assert ex["decoder_inputs"][0] == numbers.VOCAB.bos_id
    np.testing.assert_array_equal(ex["decoder_inputs"][1:11], ex["targets"][:10])
    assert ex["targets"][10] == numbers.VOCAB.eos_id and ex["inputs"][13] == numbers.VOCAB.eos_id
    assert ex["weights"].sum() == 11 and ex["inputs_valid"].sum() == 14


def test_iterator_resumes_exactly():
    cfg = config(max_number=999, validation_size=10, test_size=10, src_len=48, tgt_len=48)
    kwargs = dict(split="train", global_batch_size=4, seed=0, shuffle=True, repeat=True)
    it = numbers.make_iterator(cfg, **kwargs)
    next(it)
    state = it.get_state()
    expected = next(it)
    fresh = numbers.make_iterator(cfg, **kwargs)
    fresh.set_state(state)
    got = next(fresh)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
    assert got["inputs"].shape == (4, 48) and got["inputs"].dtype == np.int32
