"""Grain input pipeline for byte-level language modelling.

One token stream per split: every document (a play, an lm1b sentence) is byte-tokenized,
followed by a newline byte (:attr:`ByteTokenizer.separator_id`), and the documents are
concatenated in source order. The stream is cut into windows of ``seq_len + 1`` tokens
with stride ``seq_len``: window ``k`` is ``stream[k * seq_len : k * seq_len + seq_len + 1]``,
so consecutive windows share one token and every next-token pair of the stream is a
target exactly once. A window gives ``inputs = window[:-1]`` and ``targets = window[1:]``.

Global batches, then per-process rows. Every process builds the same sequence of global
batches of ``global_batch_size`` windows and keeps rows
``[p * B / P, (p + 1) * B / P)``: shards are disjoint, together they are exactly the
global batch, and the global batches do not depend on the number of processes (a run
resumed on another number of processes sees the same data). Eval drops the last
incomplete global batch, so every process runs the same number of eval steps.

Two ways to make the windows, chosen per corpus in :data:`CORPORA`:

* In memory (Shakespeare, ~5 MB): the split's token stream is one numpy array and the
  windows are a :class:`grain.MapDataset` (random access). Training shuffles *windows*
  globally with ``MapDataset.shuffle`` (a seeded index permutation, re-drawn for each
  epoch by ``repeat``); the iterator state is one integer (the next batch index).
* Streaming (lm1b, ~30M sentences, ~4 GB of text): the corpus is never materialised.
  The documents stay a random-access ``MapDataset`` over ``tfds.data_source`` (shuffled
  per epoch by the same index permutation when training) and :class:`StreamWindows`
  concatenates them lazily into windows. Its state is ``(doc_index, offset)``, the
  position of the next window's first token, so saving is O(1) and restoring re-reads
  only the few documents that the next window touches. A precomputed global window index
  was rejected: it needs one full pass over the corpus (30M records) to learn every
  document's length. Windows are shuffled only through the document order (consecutive
  rows of a batch continue each other), the usual concat-then-split trade-off. Every
  process reads the whole stream and keeps its rows: P-fold reading, which is cheap for
  byte tokens next to a model step.

Iterator state (``it.get_state()``) is a small dict of ints, JSON-serialisable; a fresh
iterator from the same arguments after ``it.set_state(state)`` yields the same batches.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from deepscale_jax.data import lm1b, shakespeare
from deepscale_jax.data.tokenizers import ByteTokenizer
from deepscale_jax.validation import check_choice

_TOKENIZER = ByteTokenizer()


@dataclasses.dataclass(frozen=True)
class Corpus:
    """How to read one corpus.

    Attributes:
      splits: the split names (TFDS slicing such as ``'train[:10%]'`` is accepted too).
      data_source: ``(split, data_dir) -> random-access sequence of records``.
      streaming: stream windows lazily (large corpora) instead of holding the split's
        tokens in memory.
      text_feature: the record feature holding the document text.
    """

    splits: tuple[str, ...]
    data_source: Callable[[str, str | None], Sequence[Mapping[str, Any]]]
    streaming: bool
    text_feature: str = "text"


CORPORA: dict[str, Corpus] = {
    "shakespeare": Corpus(shakespeare.SPLITS, shakespeare.data_source, streaming=False),
    "lm1b": Corpus(lm1b.SPLITS, lm1b.data_source, streaming=True),
}


def get_corpus(data_config) -> Corpus:
    """Returns the registered corpus named ``data_config.name``."""
    return CORPORA[check_choice(data_config.get("name"), "data.name", sorted(CORPORA))]


def lm_vocab_size(data_config) -> int:
    """Vocabulary size of the corpus's tokenizer (256: byte-level)."""
    get_corpus(data_config)
    return _TOKENIZER.vocab_size


def encode_document(record: Mapping[str, Any], text_feature: str = "text") -> np.ndarray:
    """Byte tokens of one record's text followed by the separator byte, int32."""
    text = record[text_feature]
    if isinstance(text, np.ndarray):
        text = text.item()
    tokens = _TOKENIZER.encode(text)
    return np.append(tokens, np.int32(_TOKENIZER.separator_id))


def num_windows(num_tokens: int, seq_len: int) -> int:
    """Number of windows of ``seq_len + 1`` tokens, stride ``seq_len``, in a stream."""
    return max(0, (num_tokens - 1) // seq_len)


def window_at(stream: np.ndarray, seq_len: int, index: int) -> np.ndarray:
    """Window `index` (``seq_len + 1`` tokens) of an in-memory token stream."""
    start = index * seq_len
    return stream[start : start + seq_len + 1]


def split_rows(windows: np.ndarray, *, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows ``[start, stop)`` of a global batch of windows as inputs/targets."""
    rows = windows[start:stop]
    return {
        "inputs": np.ascontiguousarray(rows[:, :-1], dtype=np.int32),
        "targets": np.ascontiguousarray(rows[:, 1:], dtype=np.int32),
    }


class _StreamWindowsIterator(grain.DatasetIterator):
    """Iterator of :class:`StreamWindows`; state: where the next window starts."""

    def __init__(self, documents: grain.MapDataset, seq_len: int):
        super().__init__()
        self._documents = documents
        self._num_documents = len(documents)
        self._seq_len = seq_len
        self._doc_index = 0  # document holding the next window's first token
        self._offset = 0  # that token's position in the document
        # Token arrays of documents doc_index, doc_index + 1, ... read so far: a cache
        # that the state does not need (set_state empties it).
        self._cache: collections.deque[np.ndarray] = collections.deque()

    def __next__(self) -> np.ndarray:
        need = self._seq_len + 1
        available = sum(len(d) for d in self._cache) - self._offset
        while available < need:
            index = self._doc_index + len(self._cache)
            if index >= self._num_documents:
                raise StopIteration
            self._cache.append(self._documents[index])
            available += len(self._cache[-1])
        pieces, start, remaining = [], self._offset, need
        for document in self._cache:
            pieces.append(document[start : start + remaining])
            remaining -= len(pieces[-1])
            start = 0
            if not remaining:
                break
        self._advance(self._seq_len)
        return np.concatenate(pieces)

    def _advance(self, num_tokens: int) -> None:
        self._offset += num_tokens
        while self._cache and self._offset >= len(self._cache[0]):
            self._offset -= len(self._cache.popleft())
            self._doc_index += 1

    def get_state(self) -> dict[str, int]:
        return {"doc_index": self._doc_index, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._doc_index = int(state["doc_index"])
        self._offset = int(state["offset"])
        self._cache.clear()


class StreamWindows(grain.IterDataset):
    """Windows of ``seq_len + 1`` tokens, stride ``seq_len``, over the lazily
    concatenated token arrays of a random-access dataset of documents."""

    def __init__(self, documents: grain.MapDataset, seq_len: int):
        super().__init__(documents)
        self._documents = documents
        self._seq_len = seq_len

    def __iter__(self) -> _StreamWindowsIterator:
        return _StreamWindowsIterator(self._documents, self._seq_len)

    def __str__(self) -> str:
        return f"StreamWindows(seq_len={self._seq_len})"


def shuffle_seed(seed: int) -> int:
    """A 32-bit shuffle seed hashed from `seed`.

    Grain reseeds epoch ``e`` with ``seed + e``; hashing keeps runs with nearby seeds
    from replaying each other's epochs.
    """
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])


def _resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # Imported only for the defaults.

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must lie in [0, process_count={process_count})"
        )
    return process_index, process_count


def _check_arguments(
    name: str, corpus: Corpus, split: str, seq_len: int, global_batch_size: int, process_count: int
) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size} must be >= 1")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}; use a multiple of {process_count}"
        )
    if split.split("[")[0] not in corpus.splits:
        raise ValueError(
            f"split={split!r} does not exist for data.name={name!r}; accepted splits: "
            f"{list(corpus.splits)} (TFDS slicing such as 'train[:10%]' is allowed)"
        )


def _too_short(where: str, seq_len: int, num_tokens: int) -> ValueError:
    fix = f"use train.seq_len <= {num_tokens - 1}" if num_tokens > 1 else "use a larger split"
    return ValueError(
        f"train.seq_len={seq_len} is longer than {where} allows: its whole token stream has "
        f"{num_tokens} tokens and a window needs train.seq_len + 1 = {seq_len + 1}; {fix}"
    )


def _in_memory_batches(
    documents: grain.MapDataset,
    *,
    where: str,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
) -> grain.IterDataset:
    """Global batches of windows of the split's token stream held in memory."""
    stream = np.concatenate([documents[i] for i in range(len(documents))])
    count = num_windows(len(stream), seq_len)
    if count == 0:
        raise _too_short(where, seq_len, len(stream))
    if not repeat and count < global_batch_size:
        raise ValueError(
            f"train.batch_size={global_batch_size} is larger than the {count} windows of "
            f"{where} at train.seq_len={seq_len}: one pass would yield no batch; use "
            f"train.batch_size <= {count} or a smaller train.seq_len"
        )
    windows = grain.MapDataset.range(count).map(functools.partial(window_at, stream, seq_len))
    if shuffle:
        windows = windows.shuffle(shuffle_seed(seed))
    if repeat:
        windows = windows.repeat()
    batches = windows.batch(global_batch_size, drop_remainder=True)
    return batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))


def _streamed_batches(
    documents: grain.MapDataset,
    *,
    where: str,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
) -> grain.IterDataset:
    """Global batches of windows streamed from (shuffled, repeated) documents."""
    total = 0  # Read documents in order until one window's worth of tokens is found.
    for i in range(len(documents)):
        total += len(documents[i])
        if total > seq_len:
            break
    else:
        raise _too_short(where, seq_len, total)
    if shuffle:
        documents = documents.shuffle(shuffle_seed(seed))
    if repeat:
        documents = documents.repeat()
    return StreamWindows(documents, seq_len).batch(global_batch_size, drop_remainder=True)


def make_lm_iterator(
    data_config,
    *,
    split: str,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """Returns this process's iterator of LM batches (see the module docstring).

    Args:
      data_config: ConfigDict with ``name`` (a key of :data:`CORPORA`) and ``data_dir``
        (str, or None for the TFDS default directory).
      split: split name of the corpus, e.g. ``'train'``, ``'validation'``.
      seq_len: tokens per row.
      global_batch_size: rows per global batch, summed over processes.
      seed: shuffle seed (ignored when ``shuffle`` is False).
      shuffle: shuffle windows (in memory) or documents (streaming), anew each epoch.
      repeat: repeat forever; otherwise one pass, the last incomplete batch dropped.
      process_index, process_count: this process and the number of processes;
        default ``jax.process_index()`` / ``jax.process_count()``.

    Returns:
      A grain ``DatasetIterator`` of ``{'inputs', 'targets'}``, each an int32 array of
      shape ``[global_batch_size // process_count, seq_len]``, with ``get_state`` /
      ``set_state``.
    """
    name = data_config.name
    corpus = get_corpus(data_config)
    process_index, process_count = _resolve_processes(process_index, process_count)
    _check_arguments(name, corpus, split, seq_len, global_batch_size, process_count)
    records = corpus.data_source(split, data_config.get("data_dir"))
    if len(records) == 0:
        raise ValueError(
            f"split={split!r} of data.name={name!r} is empty (0 documents under data.data_dir="
            f"{data_config.get('data_dir')!r}); use a non-empty split of {list(corpus.splits)}"
        )
    documents = grain.MapDataset.source(records).map(
        functools.partial(encode_document, text_feature=corpus.text_feature)
    )
    make_batches = _streamed_batches if corpus.streaming else _in_memory_batches
    batches = make_batches(
        documents,
        where=f"split={split!r} of data.name={name!r}",
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        repeat=repeat,
    )
    local_batch_size = global_batch_size // process_count
    rows = functools.partial(
        split_rows,
        start=process_index * local_batch_size,
        stop=(process_index + 1) * local_batch_size,
    )
    return iter(batches.map(rows))
