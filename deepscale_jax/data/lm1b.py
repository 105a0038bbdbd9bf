"""The One Billion Word benchmark (``lm1b``) through TFDS's real builder.

Reading uses ``tfds.data_source('lm1b', ...)``: random access into ArrayRecord files, no
TensorFlow. The data must already be prepared as ArrayRecord under the data dir
(``tfds build lm1b --file_format=array_record --data_dir=...``; TFDS's lm1b builder
downloads ~1.7 GB and needs TensorFlow's ``tf.io.gfile`` to *prepare*, not to read).
Nothing here downloads.

Each record is one sentence (feature ``text``); the pipeline byte-tokenizes the sentences
and streams them into fixed-length windows without holding the corpus in memory (see
:mod:`deepscale_jax.data.pipeline`). Tests use ``tfds.testing.mock_data`` with
``MockPolicy.USE_CODE``, which patches ``tfds.data_source`` itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from deepscale_jax.data import sources

DATASET_NAME = "lm1b"
#: The splits of TFDS's lm1b (1.1.0): ~30.3M training and ~306k test sentences.
SPLITS = ("train", "test")


def data_source(split: str, data_dir: str | None = None) -> Sequence[Mapping[str, Any]]:
    """Returns lm1b's `split` as a random-access sequence of ``{'text': ...}`` records.

    Args:
      split: a TFDS split expression over :data:`SPLITS` (``'train'``, ``'test[:1000]'``).
      data_dir: TFDS data directory; None means the TFDS default.

    Raises:
      RuntimeError: if lm1b is not prepared as ArrayRecord under `data_dir`.
      sources.CorruptDataError: if its files are corrupted or truncated (when read).
    """
    build = "tfds build lm1b --file_format=array_record --data_dir=DIR"
    note = " (downloads ~1.7 GB; TFDS's lm1b builder needs TensorFlow to prepare)"
    return sources.open_tfds_source(
        DATASET_NAME,
        split,
        data_dir,
        prepare=f"prepare it once with `{build}`{note}",
        rebuild=f"rebuild it with `{build} --overwrite`{note}",
    )
