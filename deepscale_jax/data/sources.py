"""TFDS data sources (ArrayRecord, read without TensorFlow) whose errors name the data set.

`tfds.data_source` opens a prepared data set lazily: a missing preparation fails when the
source is built, but a corrupted or truncated ArrayRecord file (a copy cut short, a disk error)
only fails when a record is read, with a Riegeli message that names neither the data set nor a
fix. `open_tfds_source` turns both into one line naming the data set, split, directory and the
command that rebuilds it (`rebuild`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

#: Errors of `tfds.data_source` for a data set that is not prepared under the data dir.
NOT_PREPARED = (AssertionError, FileNotFoundError, NotImplementedError, KeyError)
#: ArrayRecord's complaint about a split selection without records ('train[:0]').
EMPTY_SELECTION = "Paths sequence can not be of 0 length"
#: Errors of a record read from a damaged file (array_record raises RuntimeError).
READ_ERRORS = (RuntimeError, OSError, ValueError, EOFError)


class CorruptDataError(RuntimeError):
    """A prepared data set's files cannot be read back."""


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CheckedSource(Sequence):
    """A random-access `source` whose read errors become a `CorruptDataError` naming `what`
    (e.g. "shakespeare_plays split='train'"), the `directory` of its files and `rebuild`."""

    def __init__(self, source: Sequence, what: str, directory: str, rebuild: str) -> None:
        self._source, self._what = source, what
        self._directory, self._rebuild = directory, rebuild

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= index < len(self):  # iteration stops at an IndexError
            raise IndexError(f"{self._what}: record {index} of {len(self)}")
        try:
            return self._source[index]
        except READ_ERRORS as err:
            raise CorruptDataError(
                f"{self._what}: record {index} cannot be read from the ArrayRecord files in "
                f"{self._directory} ({_first_line(err)}): the files are corrupted or "
                f"truncated; {self._rebuild}"
            ) from err


def open_tfds_source(
    name: str, split: str, data_dir: str | None, prepare: str, rebuild: str
) -> Sequence[Mapping[str, Any]]:
    """`tfds.data_source(name, split=split, data_dir=data_dir)` with errors that name it.

    Args:
      name: the TFDS name (with a config: "wmt14_translate/de-en").
      split: a TFDS split expression.
      data_dir: the TFDS data directory; None means the TFDS default.
      prepare: how to prepare it, for a data set that is not prepared.
      rebuild: how to rebuild it, for one whose files are corrupted.

    Raises:
      RuntimeError: if the data set is not prepared.
      CorruptDataError: if its metadata cannot be read, or (when a record is read) if its files
        are corrupted or truncated.
    """
    import tensorflow_datasets as tfds  # here: CorruptDataError is imported without TFDS

    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except NOT_PREPARED as err:
        raise RuntimeError(
            f"{name} is not prepared as ArrayRecord under data_dir={data_dir!r}; {prepare}"
        ) from err
    except (OSError, json.JSONDecodeError) as err:  # e.g. a damaged dataset_info.json
        raise CorruptDataError(
            f"{name} split={split!r} under data_dir={data_dir!r} cannot be opened "
            f"({_first_line(err)}): its metadata is corrupted or truncated; {rebuild}"
        ) from err
    except ValueError as err:
        if EMPTY_SELECTION not in str(err):  # anything else is not about the files
            raise
        source = ()  # an empty selection ('train[:0]'): callers name the empty split
    directory = str(getattr(getattr(source, "dataset_info", None), "data_dir", data_dir))
    return CheckedSource(source, f"{name} split={split!r}", directory, rebuild)
