"""WMT translation (``wmt14_translate``/``wmt17_translate``, e.g. ``de-en``) through TFDS.

Reading uses ``tfds.data_source(f'{name}/{config}', ...)``: random access into ArrayRecord
files, no TensorFlow. The data must already be prepared as ArrayRecord under the data dir
(``tfds build wmt14_translate/de-en --file_format=array_record --data_dir=DIR``; the builder
downloads the corpora and needs TensorFlow to *prepare*, not to read). Nothing here
downloads. Each record is ``{'de': text, 'en': text}`` (features named by language code).

Vocabulary: one joint SentencePiece model (unigram; PAD=0, UNK=1, BOS=2, EOS=3) for both
languages, trained once on the first `vocab_train_sentences` pairs of the training split
(TFDS shuffles records when preparing, so the start of the split is a fair sample) and
saved at `vocab_path`; later calls load it. With several processes only process 0 trains;
the others wait for the file, so `vocab_path` must be on a filesystem they all see (or
train it once beforehand, e.g. by calling :func:`vocabulary` on one machine).

Batches come from :func:`deepscale_jax.data.translation.make_translation_iterator` (see
there for the fields). Tests use ``tfds.testing.mock_data`` with ``MockPolicy.USE_CODE``.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds
from absl import logging

# TFDS imports its old-style builders (tensorflow_datasets/translate) lazily: importing the
# modules registers `wmt14_translate`/`wmt17_translate` for tfds.data_source and mock_data.
from tensorflow_datasets.translate import wmt14, wmt17  # noqa: F401

from deepscale_jax.data import pipeline, sources, translation
from deepscale_jax.validation import (
    check_bool,
    check_choice,
    check_int,
    check_optional_str,
)

DATASETS = ("wmt14_translate", "wmt17_translate")
#: TFDS split names; slices and sums of them ("train[:1000]", "validation+test") work too.
SPLITS = ("train", "validation", "test")
DEFAULTS: dict[str, Any] = {
    "config": "de-en",
    "source_language": "de",
    "target_language": "en",
    "data_dir": None,
    "vocab_path": None,  # None: <data_dir>/sentencepiece/<name>_<config>_<vocab_size>.model
    "vocab_size": 32000,
    "vocab_train_sentences": 1_000_000,  # pairs; both sides feed one joint model
    "src_len": 256,
    "tgt_len": 256,
    "truncate": True,
}
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
#: Vocabularies at least this large use SentencePiece's byte fallback (256 byte pieces), so
#: no character ever becomes UNK; smaller (test) ones keep every seen character instead.
BYTE_FALLBACK_MIN_VOCAB = 1024
#: How long processes other than 0 wait for process 0 to train the vocabulary (seconds).
WAIT_TIMEOUT_S = 4 * 3600.0
POLL_S = 5.0


def option(data_config: Mapping[str, Any], name: str) -> Any:
    """`data_config[name]` (a ConfigDict or dict), else :data:`DEFAULTS`, cast like it."""
    value = data_config.get(name, DEFAULTS[name])
    default = DEFAULTS[name]
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        return int(value)
    return value


def check_options(data_config: Mapping[str, Any]) -> None:
    """The types and ranges of this data set's options that `data_config` sets (whichever
    data set it names); `validate` checks the chosen data set's names against TFDS."""
    for name in ("config", "source_language", "target_language"):
        if name in data_config and not isinstance(data_config[name], str):
            raise ValueError(f"data.{name}={data_config[name]!r} must be a string")
    if "vocab_path" in data_config:
        check_optional_str(data_config["vocab_path"], "data.vocab_path", "a file path")
    for name, minimum in (
        ("vocab_size", 8),
        ("vocab_train_sentences", 1),
        ("src_len", 2),
        ("tgt_len", 2),
    ):
        if name in data_config:
            check_int(data_config[name], f"data.{name}", minimum=minimum)
    if "truncate" in data_config:
        check_bool(data_config["truncate"], "data.truncate")


def validate(data_config: Mapping[str, Any]) -> None:
    """The options (`check_options`), data.name, data.config and the language pair."""
    check_options(data_config)
    name = dataset_name(data_config)
    configs = list(tfds.builder_cls(name).builder_configs)
    check_choice(option(data_config, "config"), "data.config", configs)
    languages(data_config)


def dataset_name(data_config: Mapping[str, Any]) -> str:
    """`data.name`, checked to be one of :data:`DATASETS`."""
    return check_choice(data_config.get("name", DATASETS[0]), "data.name", DATASETS)


def languages(data_config: Mapping[str, Any]) -> tuple[str, str]:
    """(source, target) language codes, checked against the config's pair ('de-en')."""
    config = option(data_config, "config")
    pair = config.split("-")
    src, tgt = option(data_config, "source_language"), option(data_config, "target_language")
    for what, lang in (("source_language", src), ("target_language", tgt)):
        if lang not in pair:
            raise ValueError(f"data.{what}={lang!r} is not in data.config={config!r}: {pair}")
    if src == tgt:
        raise ValueError(f"data.source_language and data.target_language are both {src!r}")
    return src, tgt


def data_source(
    name: str, config: str, split: str, data_dir: str | None = None
) -> Sequence[Mapping[str, Any]]:
    """`name/config`'s `split` as a random-access sequence of ``{lang: text}`` records.

    Raises:
      ValueError: for a name not in :data:`DATASETS`, an unknown config or split.
      RuntimeError: if the data set is not prepared as ArrayRecord under `data_dir`.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown WMT data set {name!r}; accepted: {list(DATASETS)}")
    configs = list(tfds.builder_cls(name).builder_configs)
    if config not in configs:
        raise ValueError(f"{name} has no config {config!r}; accepted: {configs}")
    for part in split.split("+"):
        if part.split("[")[0].strip() not in SPLITS:
            raise ValueError(f"split={split!r} of {name}: accepted splits {list(SPLITS)}")
    build = f"tfds build {name}/{config} --file_format=array_record --data_dir=DIR"
    note = " (downloads the WMT corpora; the builder needs TensorFlow to prepare, not to read)"
    return sources.open_tfds_source(
        f"{name}/{config}",
        split,
        data_dir,
        prepare=f"prepare it once with `{build}`{note}",
        rebuild=f"rebuild it with `{build} --overwrite`{note}",
    )


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _pair(record: Mapping[str, Any], source: str, target: str) -> tuple[str, str]:
    return _text(record[source]), _text(record[target])


class SentencePieceVocabulary:
    """The :class:`translation.Vocabulary` of a SentencePiece model trained by
    :func:`train_vocabulary` (PAD=0, UNK=1, BOS=2, EOS=3)."""

    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def __init__(self, model_path: str | os.PathLike) -> None:
        self.model_path = os.fspath(model_path)
        self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"{self.model_path} has pad/unk/bos/eos ids {ids}, expected "
                f"{(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; train it with wmt.train_vocabulary"
            )
        self.vocab_size = self._sp.get_piece_size()

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of `text`, without specials."""
        return np.asarray(self._sp.encode(text), np.int32)

    def decode(self, ids: Any) -> str:
        """Text of the ids before the first EOS or PAD (BOS and out-of-range ids dropped)."""
        kept = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i in (EOS_ID, PAD_ID):
                break
            if i != BOS_ID and 0 <= i < self.vocab_size:
                kept.append(i)
        return self._sp.decode(kept)


def train_vocabulary(
    sentences: Iterable[str],
    path: str | os.PathLike,
    vocab_size: int,
    *,
    byte_fallback: bool | None = None,
    model_type: str = "unigram",
) -> str:
    """Trains a joint SentencePiece model on `sentences` and writes it atomically to `path`
    (a temporary file in the same directory, then ``os.replace``); returns the path.

    `vocab_size` is an upper bound (``hard_vocab_limit=False``: a tiny corpus gives fewer
    pieces). `byte_fallback` (None: ``vocab_size >= BYTE_FALLBACK_MIN_VOCAB``) spells
    unseen characters as UTF-8 bytes; without it every character seen is kept.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".model", dir=directory)
    except OSError as e:
        raise PermissionError(
            f"cannot write the SentencePiece model {path!r} ({e}); set data.vocab_path to a "
            "file in a writable directory"
        ) from e
    if byte_fallback is None:
        byte_fallback = vocab_size >= BYTE_FALLBACK_MIN_VOCAB
    try:
        with os.fdopen(fd, "wb") as f:
            spm.SentencePieceTrainer.train(
                sentence_iterator=(s for s in sentences if s.strip()),
                model_writer=f,
                vocab_size=vocab_size,
                model_type=model_type,
                pad_id=PAD_ID,
                unk_id=UNK_ID,
                bos_id=BOS_ID,
                eos_id=EOS_ID,
                byte_fallback=byte_fallback,
                character_coverage=0.9999 if byte_fallback else 1.0,
                hard_vocab_limit=False,
                minloglevel=1,
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def vocab_path(data_config: Mapping[str, Any]) -> str:
    """`data.vocab_path`, else ``<data_dir>/sentencepiece/<name>_<config>_<vocab_size>.model``
    (data_dir None: the TFDS default data directory)."""
    path = option(data_config, "vocab_path")
    if path:
        return os.fspath(path)
    data_dir = option(data_config, "data_dir") or tfds.core.constants.get_default_data_dir()
    name = f"{dataset_name(data_config)}_{option(data_config, 'config')}"
    return os.path.join(
        data_dir, "sentencepiece", f"{name}_{option(data_config, 'vocab_size')}.model"
    )


def training_sentences(data_config: Mapping[str, Any]) -> Iterator[str]:
    """Source then target text of the first `vocab_train_sentences` training pairs."""
    src, tgt = languages(data_config)
    source = data_source(
        dataset_name(data_config),
        option(data_config, "config"),
        "train",
        option(data_config, "data_dir"),
    )
    for i in range(min(option(data_config, "vocab_train_sentences"), len(source))):
        record = source[i]
        yield _text(record[src])
        yield _text(record[tgt])


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> SentencePieceVocabulary:
    del mtime_ns  # Part of the cache key only: a retrained file is reloaded.
    return SentencePieceVocabulary(path)


def vocabulary(
    data_config: Mapping[str, Any], *, process_index: int | None = None
) -> SentencePieceVocabulary:
    """The SentencePiece vocabulary at :func:`vocab_path`, trained and saved there first if
    missing (by process 0 only; other processes poll for the file up to WAIT_TIMEOUT_S)."""
    path = vocab_path(data_config)
    if not os.path.exists(path):
        if process_index is None:
            import jax  # Imported only for the default.

            process_index = jax.process_index()
        if process_index == 0:
            languages(data_config)  # Checked before the long training.
            logging.info(
                "Training the SentencePiece vocabulary (vocab_size=%d) on the first %d pairs "
                "of %s/%s train into %s",
                option(data_config, "vocab_size"),
                option(data_config, "vocab_train_sentences"),
                dataset_name(data_config),
                option(data_config, "config"),
                path,
            )
            train_vocabulary(
                training_sentences(data_config), path, option(data_config, "vocab_size")
            )
        else:
            deadline = time.monotonic() + WAIT_TIMEOUT_S
            while not os.path.exists(path):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"process {process_index} waited {WAIT_TIMEOUT_S:.0f} s for process 0 to "
                        f"train the vocabulary {path!r}; data.vocab_path must be on a filesystem "
                        "shared by all processes (or train it beforehand with wmt.vocabulary)"
                    )
                time.sleep(min(POLL_S, WAIT_TIMEOUT_S))
    return _load(path, os.stat(path).st_mtime_ns)


def make_iterator(
    data_config: Mapping[str, Any],
    *,
    split: str,
    global_batch_size: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """This process's iterator of translation batches of `split` (fields
    [global_batch_size // process_count, src_len or tgt_len], ids of :func:`vocabulary`);
    eval (no repeat) drops the last incomplete global batch."""
    process_index, process_count = pipeline._resolve_processes(process_index, process_count)
    name, config = dataset_name(data_config), option(data_config, "config")
    records = data_source(name, config, split, option(data_config, "data_dir"))
    src, tgt = languages(data_config)
    vocab = vocabulary(data_config, process_index=process_index)
    pairs = grain.MapDataset.source(records).map(functools.partial(_pair, source=src, target=tgt))
    return translation.make_translation_iterator(
        pairs,
        vocab,
        src_len=option(data_config, "src_len"),
        tgt_len=option(data_config, "tgt_len"),
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        repeat=repeat,
        truncate=option(data_config, "truncate"),
        split=split,
        process_index=process_index,
        process_count=process_count,
    )
