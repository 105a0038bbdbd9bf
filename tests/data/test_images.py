"""Image data: digits splits, batches, augmentation, resume; CIFAR-10 / ImageNet under
`tfds.testing.mock_data` (USE_CODE: random records from the real builders' feature specs)."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from deepscale_jax.data import images


def digits(**fields):
    return ConfigDict({"name": "digits", "data_dir": None, **fields})


def make(config, **kwargs):
    args = dict(split="train", global_batch_size=16, seed=0, training=True)
    args.update(process_index=0, process_count=1)
    args.update(kwargs)
    return images.make_image_iterator(config, **args)


def assert_batch(batch, size, channels, rows):
    assert batch["image"].shape == (rows, size, size, channels)
    assert batch["image"].dtype == np.float32
    assert batch["label"].shape == (rows,) and batch["label"].dtype == np.int32
    assert batch["weights"].shape == (rows,) and batch["weights"].dtype == np.float32
    assert np.all(np.isfinite(batch["image"]))


def test_digits_splits_are_fixed_disjoint_and_complete():
    parts = {s: images.digits_split_indices(s) for s in ("train", "validation", "test")}
    assert [len(parts[s]) for s in ("train", "validation", "test")] == [1257, 270, 270]
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(1797))
    assert len(set(images.digits_split_indices("test")[:5])) == 5
    np.testing.assert_array_equal(parts["test"], images.digits_split_indices("test"))


def test_digits_eval_pass_covers_every_example_once():
    batches = list(make(digits(), split="test", global_batch_size=64, training=False))
    assert len(batches) == 5  # 270 examples -> 4 full batches + one padded
    for b in batches:
        assert_batch(b, 8, 1, 64)
    weights = np.concatenate([b["weights"] for b in batches])
    assert weights.sum() == 270 and np.all(weights[:270] == 1) and np.all(weights[270:] == 0)
    source = images.digits_source("test")
    labels = np.concatenate([b["label"] for b in batches])[:270]
    np.testing.assert_array_equal(labels, [source[i]["label"] for i in range(270)])
    first = (source[0]["image"].astype(np.float32) / 16 - 0.305) / 0.376
    np.testing.assert_allclose(batches[0]["image"][0], first, rtol=1e-6)


def test_digits_training_is_seeded_sharded_and_resumable():
    a = [next(it) for it in [make(digits())] for _ in range(3)]
    b = make(digits())
    for want in a:
        np.testing.assert_array_equal(next(b)["image"], want["image"])
    halves = [make(digits(), process_index=p, process_count=2) for p in range(2)]
    for want in a:
        got = np.concatenate([next(h)["image"] for h in halves])
        np.testing.assert_array_equal(got, want["image"])
    it = make(digits())
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = next(it)
    resumed = make(digits())
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["image"], expected["image"])
    # Augmented ("shift"): some training image differs from its plain form.
    plain = make(digits(augment="none"))
    shifted = make(digits(augment="shift"))
    assert not np.array_equal(next(shifted)["image"], next(plain)["image"])


def test_augmentations_keep_shape():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    assert images.random_resized_crop(image, rng, 24).shape == (24, 24, 3)
    assert images.resize_center_crop(image, 24).shape == (24, 24, 3)
    assert images.pad_random_crop(image, rng).shape == image.shape
    flipped = [
        np.array_equal(images.random_flip(image, np.random.default_rng(s)), image[:, ::-1])
        for s in range(20)
    ]
    assert 0 < sum(flipped) < 20


@pytest.mark.parametrize(
    ("name", "split", "size", "fields"),
    [
        ("cifar10", "train", 32, {}),
        ("cifar10", "test", 32, {}),
        ("imagenet2012", "train", 24, {"image_size": 24}),
        ("imagenet2012", "validation", 24, {"image_size": 24}),
    ],
)
def test_tfds_loaders_under_mock_data(name, split, size, fields):
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
        config = ConfigDict({"name": name, "data_dir": None, **fields})
        training = split == "train"
        it = make(config, split=split, global_batch_size=8, training=training)
        batches = [b for _, b in zip(range(3), it, strict=False)]
        for b in batches:
            assert_batch(b, size, 3, 8)
            num_classes = images.IMAGE_DATASETS[name].num_classes
            assert np.all((b["label"] >= 0) & (b["label"] < num_classes))
        if not training:  # 20 examples -> 3 batches of 8, the last with 4 fillers
            assert len(batches) == 3
            assert np.concatenate([b["weights"] for b in batches]).sum() == 20


@pytest.mark.parametrize(
    ("config", "kwargs", "message"),
    [
        (digits(name="mnist"), {}, r"unknown data.name='mnist'; accepted: digits, cifar10"),
        (digits(), {"split": "dev"}, r"split='dev' does not exist for data.name='digits'"),
        (digits(augment="mixup"), {}, r"unknown data.augment='mixup'"),
        (ConfigDict({"name": "imagenet2012", "data_dir": None}), {}, r"needs data.image_size"),
    ],
)
def test_bad_data_config(config, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(config, **kwargs)


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
    config = ConfigDict({"name": "cifar10", "data_dir": str(tmp_path)})
    with pytest.raises(RuntimeError, match=r"cifar10 is not prepared.*tfds build cifar10"):
        make(config)
