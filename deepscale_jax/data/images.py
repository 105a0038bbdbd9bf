"""Image-classification batches: scikit-learn's digits (embedded), and CIFAR-10 / ImageNet
through TFDS data sources, all read with grain.

Datasets (:data:`IMAGE_DATASETS`, chosen by ``data.name``):

* ``digits``: scikit-learn's ``load_digits`` (1797 8x8 grayscale images, pixel values 0..16,
  10 classes; the UCI optical digits test set). Ships with scikit-learn, nothing is
  downloaded. Splits are fixed by one seeded permutation (:data:`DIGITS_SPLIT_SEED`) of the
  1797 indices: the first 270 are ``test``, the next 270 ``validation``, the other 1257
  ``train``. No augmentation by default (digits are not flip-invariant; ``data.augment =
  'shift'``, a random shift by up to one pixel, is available but trained slower here).
* ``cifar10`` (``train``/``test``, 32x32x3): training pads 4 pixels with zeros, takes a
  random 32x32 crop and flips horizontally with probability 1/2 (He et al. 2016, sec. 4.2).
* ``imagenet2012`` (``train``/``validation``, any size): training takes an Inception-style
  random-resized crop (area fraction U(0.08, 1), log-uniform aspect ratio in [3/4, 4/3];
  Szegedy et al. 2015, as in torchvision's ``RandomResizedCrop``) resized to
  ``data.image_size`` and flips with probability 1/2; evaluation resizes the shorter side to
  ``image_size / 0.875`` and takes the central ``image_size`` square.
  CIFAR-10 and ImageNet must be prepared as ArrayRecord (``tfds build NAME
  --file_format=array_record``); tests use ``tfds.testing.mock_data``.

``data.augment`` overrides a dataset's augmentation (:data:`AUGMENTATIONS`).

Pixels are scaled to [0, 1] and standardised per channel: (x / max_value - mean) / std.

Batches are ``{'image': float32 [B, H, W, C], 'label': int32 [B], 'weights': float32 [B]}``.
Training shuffles (seeded, anew each epoch) and repeats; the random augmentation of stream
position i draws from ``numpy.random.default_rng([seed, i])``, so the iterator state (the next
batch index) fixes every future batch and a resumed run is exact. An evaluation pass is
ordered and covers every example once: the last batch is filled with zero images of weight 0.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image

from deepscale_jax.data import pipeline, sources
from deepscale_jax.data.sources import CorruptDataError
from deepscale_jax.validation import check_choice

DIGITS_SPLIT_SEED = 0
DIGITS_HELD_OUT = 270  # test and validation examples each


class ArraySource(Sequence):
    """A random-access source of ``{'image', 'label'}`` records over two arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "label": self.labels[index]}


#: SHA-256 (first 16 hex digits) of the digits' uint8 images then int32 labels, scikit-learn 1.9.1.
DIGITS_SHA256 = "fe61bc84cd6a594d"
DIGITS_REINSTALL = "reinstall it: pip install --force-reinstall scikit-learn==1.9.1"


def check_digits(images: np.ndarray, labels: np.ndarray, path: str) -> None:
    """Raises CorruptDataError unless (images, labels) are the 1,797 8x8 digits (values 0..16,
    labels 0..9) that scikit-learn ships in `path`, byte for byte (DIGITS_SHA256)."""
    digest = hashlib.sha256(
        images.astype(np.uint8).tobytes() + labels.astype(np.int32).tobytes()
    ).hexdigest()[:16]
    if images.shape != (1797, 8, 8) or digest != DIGITS_SHA256:
        raise CorruptDataError(
            f"{path} is corrupted or truncated: it decodes to {len(images)} images of shape "
            f"{images.shape[1:]} with SHA-256 {digest}..., expected 1797 of (8, 8) with "
            f"{DIGITS_SHA256}...; {DIGITS_REINSTALL}"
        )


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images (1797, 8, 8, 1) uint8 0..16, labels, the split permutation), checked."""
    from importlib import resources

    from sklearn.datasets import load_digits

    path = str(resources.files("sklearn.datasets") / "data" / "digits.csv.gz")
    try:
        digits = load_digits()
    except (OSError, EOFError, ValueError, zlib.error) as err:
        raise CorruptDataError(
            f"{path} cannot be read ({type(err).__name__}: {str(err)[:120]}): the file is "
            f"corrupted or truncated; {DIGITS_REINSTALL}"
        ) from err
    check_digits(digits.images, digits.target, path)
    images = digits.images.astype(np.uint8)[..., None]
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
    return images, digits.target.astype(np.int32), order


def digits_split_indices(split: str) -> np.ndarray:
    """Indices into ``load_digits()`` of `split` (train / validation / test), disjoint."""
    _, _, order = _digits()
    h = DIGITS_HELD_OUT
    return {"test": order[:h], "validation": order[h : 2 * h], "train": order[2 * h :]}[split]


def digits_source(split: str, data_dir: str | None = None) -> ArraySource:
    del data_dir  # shipped with scikit-learn
    images, labels, _ = _digits()
    index = digits_split_indices(split)
    return ArraySource(images[index], labels[index])


def tfds_source(name: str, split: str, data_dir: str | None) -> Sequence[Mapping[str, Any]]:
    build = f"tfds build {name} --file_format=array_record --data_dir=DIR"
    return sources.open_tfds_source(
        name,
        split,
        data_dir,
        prepare=f"prepare it once with `{build}`",
        rebuild=f"rebuild it with `{build} --overwrite`",
    )


@dataclasses.dataclass(frozen=True)
class ImageDataset:
    splits: tuple[str, ...]
    image_size: int | None  # native square size; None = varies (then data.image_size is needed)
    channels: int
    num_classes: int
    max_value: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # one of AUGMENTATIONS
    source: Callable[[str, str | None], Sequence[Mapping[str, Any]]]


AUGMENTATIONS = ("none", "shift", "pad_crop_flip", "inception_crop_flip")

IMAGE_DATASETS: dict[str, ImageDataset] = {
    "digits": ImageDataset(
        ("train", "validation", "test"), 8, 1, 10, 16.0, (0.305,), (0.376,), "none", digits_source
    ),
    "cifar10": ImageDataset(
        ("train", "test"),
        32,
        3,
        10,
        255.0,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        "pad_crop_flip",
        functools.partial(tfds_source, "cifar10"),
    ),
    "imagenet2012": ImageDataset(
        ("train", "validation"),
        None,
        3,
        1000,
        255.0,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        "inception_crop_flip",
        functools.partial(tfds_source, "imagenet2012"),
    ),
}


def get_image_dataset(data_config) -> ImageDataset:
    return IMAGE_DATASETS[check_choice(data_config.get("name"), "data.name", IMAGE_DATASETS)]


def image_size(data_config) -> int:
    """The square side of the model's input: ``data.image_size`` or the native size."""
    spec = get_image_dataset(data_config)
    size = data_config.get("image_size") or spec.image_size
    if size is None:
        raise ValueError(f"data.name={data_config.name!r} needs data.image_size (e.g. 224)")
    return int(size)


# ----------------------------------------------------------------------------- preprocessing


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 (H, W, C) image (PIL)."""
    if image.shape[:2] == (height, width):
        return image
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = np.asarray(pil.resize((width, height), Image.BILINEAR))
    return out[..., None] if channels == 1 else out


def random_resized_crop(
    image: np.ndarray,
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Inception crop: area fraction ~ U(scale), aspect ~ log-U(ratio); 10 tries, then the
    central crop of the clamped ratio (torchvision's RandomResizedCrop)."""
    height, width = image.shape[:2]
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return resize(image[top : top + h, left : left + w], size, size)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return resize(image[top : top + h, left : left + w], size, size)


def resize_center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Shorter side resized to round(size / crop_fraction), then the central size x size."""
    height, width = image.shape[:2]
    short = round(size / crop_fraction)
    scale = short / min(height, width)
    h, w = max(size, round(height * scale)), max(size, round(width * scale))
    image = resize(image, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    return image[top : top + size, left : left + size]


def pad_random_crop(image: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """Zero-pad `pad` pixels on each side, then a random crop of the original size."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    return padded[top : top + height, left : left + width]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return image[:, ::-1] if rng.random() < 0.5 else image


def preprocess(
    image: np.ndarray,
    spec: ImageDataset,
    size: int,
    rng: np.random.Generator | None,
    augment: str = "none",
) -> np.ndarray:
    """uint8 (H, W, C) -> standardised float32 (size, size, C). Evaluation (`rng` None):
    datasets of varying size (ImageNet) resize + center-crop, the others resize to `size`.
    Training applies `augment` (one of AUGMENTATIONS) with `rng`."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if rng is not None and augment == "inception_crop_flip":
        image = random_flip(random_resized_crop(image, rng, size), rng)
    elif spec.image_size is None:
        image = resize_center_crop(image, size)
    else:
        image = resize(image, size, size)
    if rng is not None and augment == "pad_crop_flip":
        image = random_flip(pad_random_crop(image, rng), rng)
    elif rng is not None and augment == "shift":
        image = pad_random_crop(image, rng, pad=1)
    x = image.astype(np.float32) / spec.max_value
    return (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)


def _example(
    spec: ImageDataset, size: int, seed: int, augment: str, index: int, record: Any
) -> dict[str, np.ndarray]:
    if not record:  # {}: filler of the last evaluation batch
        return {
            "image": np.zeros((size, size, spec.channels), np.float32),
            "label": np.int32(0),
            "weights": np.float32(0.0),
        }
    rng = np.random.default_rng([seed, index]) if augment != "none" else None
    return {
        "image": preprocess(record["image"], spec, size, rng, augment),
        "label": np.int32(record["label"]),
        "weights": np.float32(1.0),
    }


class _PaddedSource(Sequence):
    """`source` followed by empty records ({}) up to `length` items (grain drops None)."""

    def __init__(self, source: Sequence, length: int) -> None:
        self.source, self.length = source, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.source[index] if index < len(self.source) else {}


def make_image_iterator(
    data_config,
    *,
    split: str,
    global_batch_size: int,
    seed: int,
    training: bool,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """This process's batches of `split` (see the module docstring): shuffled, augmented and
    endless when `training`, one ordered pass (last batch padded with weight 0) otherwise."""
    spec = get_image_dataset(data_config)
    size = image_size(data_config)
    process_index, process_count = pipeline._resolve_processes(process_index, process_count)
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}"
        )
    if split.split("[")[0] not in spec.splits:
        raise ValueError(
            f"split={split!r} does not exist for data.name={data_config.name!r}; "
            f"accepted splits: {list(spec.splits)}"
        )
    source = spec.source(split, data_config.get("data_dir"))
    if len(source) == 0:
        raise ValueError(
            f"split={split!r} of data.name={data_config.name!r} is empty (0 examples); use a "
            f"non-empty split of {list(spec.splits)}"
        )
    if training:
        records = grain.MapDataset.source(source).shuffle(pipeline.shuffle_seed(seed)).repeat()
    else:
        padded = -(-len(source) // global_batch_size) * global_batch_size
        records = grain.MapDataset.source(_PaddedSource(source, padded))
    augment = (data_config.get("augment") or spec.augment) if training else "none"
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown data.augment={augment!r}; accepted: {', '.join(AUGMENTATIONS)}")
    examples = records.map_with_index(functools.partial(_example, spec, size, seed, augment))
    batches = examples.batch(global_batch_size, drop_remainder=True)
    local = global_batch_size // process_count
    start, stop = process_index * local, (process_index + 1) * local
    batches = batches.map(lambda b: {k: v[start:stop] for k, v in b.items()})
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
