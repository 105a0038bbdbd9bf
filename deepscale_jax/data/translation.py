"""Sentence-pair batches for translation, shared by every seq2seq data set.

A data set (data/numbers.py, data/wmt.py) supplies a grain ``MapDataset`` of (source text,
target text) pairs and a :class:`Vocabulary`; this module turns them into fixed-shape
batches. One example of source ids s and target ids y (no specials):
    inputs         = s + [EOS], padded with PAD to `src_len`
    decoder_inputs = [BOS] + y, padded to `tgt_len`
    targets        = y + [EOS], padded to `tgt_len`
with `inputs_valid`, `targets_valid` (bool, non-pad) and `weights` (float32, 1 on targets).
A pair longer than the lengths is an error, or with `truncate=True` cut to fit (the EOS
kept), as usual for the long tail of WMT sentences.

The iterator is a grain ``MapDataset`` pipeline (shuffled per epoch and repeated when
training), so its state (the next batch index) is JSON-serialisable and restores the exact
stream, as in the other pipelines.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol

import grain
import numpy as np

from deepscale_jax.data import pipeline
from deepscale_jax.data.tokenizers import ByteTokenizer


class Vocabulary(Protocol):
    """Text <-> ids with the three specials a translation model needs."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of `text`, without specials."""
        ...

    def decode(self, ids) -> str:
        """Text of the ids before the first EOS or PAD (other specials dropped)."""
        ...


class ByteVocabulary:
    """UTF-8 bytes 0..255, then PAD = 256, BOS = 257, EOS = 258 (vocab_size 259)."""

    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> np.ndarray:
        return ByteTokenizer().encode(text)

    def decode(self, ids) -> str:
        out = bytearray()
        for i in np.asarray(ids).reshape(-1).tolist():
            if i in (self.eos_id, self.pad_id):
                break
            if 0 <= i < 256:
                out.append(i)
        return out.decode("utf-8", errors="replace")


def _fit(ids: np.ndarray, length: int, what: str, truncate: bool, text: str) -> np.ndarray:
    """`ids` (one special already included) cut to `length` if `truncate`, else checked."""
    if len(ids) <= length:
        return ids
    if not truncate:
        raise ValueError(
            f"the {what} {text[:60]!r} has {len(ids)} tokens with its special > "
            f"data.{what}_len={length}; raise data.{what}_len or set data.truncate=True"
        )
    return ids[:length]


def make_example(
    source: str, target: str, vocab: Vocabulary, src_len: int, tgt_len: int, truncate: bool
) -> dict[str, np.ndarray]:
    """One example (see the module docstring) of the pair (source, target)."""
    src = vocab.encode(source).astype(np.int32)
    tgt = vocab.encode(target).astype(np.int32)
    src = _fit(np.append(src, vocab.eos_id), src_len, "src", truncate, source)
    if truncate and len(src) == src_len:
        src[-1] = vocab.eos_id
    decoder_inputs = _fit(np.insert(tgt, 0, vocab.bos_id), tgt_len, "tgt", truncate, target)
    targets = _fit(np.append(tgt, vocab.eos_id), tgt_len, "tgt", truncate, target)
    if truncate and len(targets) == tgt_len:
        targets[-1] = vocab.eos_id

    def padded(ids: np.ndarray, length: int) -> np.ndarray:
        out = np.full((length,), vocab.pad_id, np.int32)
        out[: len(ids)] = ids
        return out

    inputs = padded(src, src_len)
    targets = padded(targets, tgt_len)
    return {
        "inputs": inputs,
        "inputs_valid": inputs != vocab.pad_id,
        "decoder_inputs": padded(decoder_inputs, tgt_len),
        "targets": targets,
        "targets_valid": targets != vocab.pad_id,
        "weights": (targets != vocab.pad_id).astype(np.float32),
    }


def make_translation_iterator(
    pairs: grain.MapDataset,
    vocab: Vocabulary,
    *,
    src_len: int,
    tgt_len: int,
    global_batch_size: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
    truncate: bool = False,
    split: str = "?",
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """This process's iterator of translation batches from `pairs` (a ``MapDataset`` of
    (source, target) text): fields [global_batch_size // process_count, src_len or tgt_len];
    eval (no repeat) drops the last incomplete global batch."""
    process_index, process_count = pipeline._resolve_processes(process_index, process_count)
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}"
        )
    if len(pairs) == 0:
        raise ValueError(f"split={split!r} is empty (0 sentence pairs); use a non-empty split")
    if not repeat and len(pairs) < global_batch_size:
        raise ValueError(
            f"train.batch_size={global_batch_size} is larger than the {len(pairs)} examples "
            f"of split={split!r}: one pass would yield no batch; use train.batch_size <= "
            f"{len(pairs)}"
        )
    examples = pairs
    if shuffle:
        examples = examples.shuffle(pipeline.shuffle_seed(seed))
    if repeat:
        examples = examples.repeat()
    to_example: Callable = functools.partial(
        _pair_example, vocab=vocab, src_len=src_len, tgt_len=tgt_len, truncate=truncate
    )
    batches = examples.map(to_example).batch(global_batch_size, drop_remainder=True)
    local = global_batch_size // process_count
    start, stop = process_index * local, (process_index + 1) * local
    batches = batches.map(lambda b: {k: v[start:stop] for k, v in b.items()})
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def _pair_example(pair, vocab, src_len, tgt_len, truncate) -> dict[str, np.ndarray]:
    source, target = pair
    return make_example(source, target, vocab, src_len, tgt_len, truncate)
