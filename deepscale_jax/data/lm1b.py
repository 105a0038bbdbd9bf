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

import tensorflow_datasets as tfds

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
    """
    try:
        return tfds.data_source(DATASET_NAME, split=split, data_dir=data_dir, download=False)
    except (AssertionError, FileNotFoundError, NotImplementedError) as e:
        raise RuntimeError(
            f"lm1b is not prepared as ArrayRecord under data_dir={data_dir!r}; prepare it "
            "once with `tfds build lm1b --file_format=array_record --data_dir=DIR` "
            "(downloads ~1.7 GB; TFDS's lm1b builder needs TensorFlow to prepare)"
        ) from e
