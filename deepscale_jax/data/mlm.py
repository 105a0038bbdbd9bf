"""Masked-language-model batches over a byte-level corpus (BERT-style; Devlin et al. 2019).

Vocabulary: the 256 bytes, then two special tokens, :data:`PAD_ID` = 256 and
:data:`MASK_ID` = 257 (:data:`VOCAB_SIZE` = 258).

Examples (fixed per split, built once in memory). Every document is cut after each blank
line (``"\\n\\n"``) into paragraphs (a speech, a stage direction, a heading); a paragraph
longer than ``seq_len`` is cut into ``seq_len`` pieces. Consecutive pieces of one document
are packed greedily into rows of at most ``seq_len`` tokens and the rest of the row is
``PAD_ID`` (the BERT recipe of packing sentences up to the maximum length, here with
paragraph boundaries). Rows never cross documents. ``valid = tokens != PAD_ID``.

Masking (Devlin et al. 2019, sec. 3.1 and appendix A.1, in the per-token Bernoulli form of
RoBERTa / HF's ``DataCollatorForLanguageModeling``): each valid token is selected for
prediction with probability ``mask_rate`` (0.15); a selected token's input becomes
``MASK_ID`` with probability 0.8, a uniformly random byte with probability 0.1, and stays
itself with probability 0.1. ``targets`` are the original tokens and ``weights`` are 1 at
selected positions, 0 elsewhere (pads are never selected).

Determinism: the masking of the element at position ``i`` of the (shuffled, repeated)
example stream draws from ``numpy.random.default_rng([seed, i])``. A position is one
example of one epoch, so masks differ between epochs, and the iterator's state (the next
batch index, as in the LM pipeline) fixes every future mask: a resumed run sees exactly
the batches of an uninterrupted one. Evaluation uses the same rule with ``shuffle=False``,
so every evaluation masks the same positions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import grain
import numpy as np

from deepscale_jax.data import pipeline
from deepscale_jax.data.tokenizers import ByteTokenizer
from deepscale_jax.validation import check_number

PAD_ID = 256
MASK_ID = 257
VOCAB_SIZE = 258
NUM_BYTES = ByteTokenizer.vocab_size


@dataclasses.dataclass(frozen=True)
class MaskingRates:
    """mask_rate: P(selected | valid); mask_token/random_token: P(MASK) / P(random byte)
    given selected (the rest keep their token)."""

    mask_rate: float = 0.15
    mask_token: float = 0.8
    random_token: float = 0.1

    def validate(self) -> None:
        if not 0.0 < self.mask_rate <= 1.0:
            raise ValueError(f"data.mask_rate={self.mask_rate!r} must lie in (0, 1]")
        if min(self.mask_token, self.random_token) < 0 or self.mask_token + self.random_token > 1:
            raise ValueError(
                f"data.mask_token_rate={self.mask_token!r} and data.random_token_rate="
                f"{self.random_token!r} must be >= 0 with a sum <= 1"
            )


def paragraph_pieces(document: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """`document` cut after every blank line, long paragraphs cut into `seq_len` pieces;
    the pieces concatenate back to the document."""
    newline = document == ord("\n")
    ends = np.flatnonzero(newline[:-1] & newline[1:]) + 2  # cut after "\n\n"
    pieces = []
    for paragraph in np.split(document, ends):
        pieces += [paragraph[i : i + seq_len] for i in range(0, len(paragraph), seq_len)]
    return [p for p in pieces if len(p)]


def pack_rows(documents: Sequence[np.ndarray], seq_len: int) -> np.ndarray:
    """(N, seq_len) int32 rows of greedily packed paragraph pieces, padded with PAD_ID."""
    rows: list[np.ndarray] = []
    for document in documents:
        current: list[np.ndarray] = []
        used = 0
        for piece in paragraph_pieces(np.asarray(document), seq_len):
            if used + len(piece) > seq_len:
                rows.append(np.concatenate(current))
                current, used = [], 0
            current.append(piece)
            used += len(piece)
        if current:
            rows.append(np.concatenate(current))
    out = np.full((len(rows), seq_len), PAD_ID, np.int32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def mask_row(tokens: np.ndarray, rng: np.random.Generator, rates: MaskingRates) -> dict:
    """One row's `inputs` (masked), `targets`, `weights` (1 = predict) and `valid`."""
    valid = tokens != PAD_ID
    selected = (rng.random(tokens.shape) < rates.mask_rate) & valid
    action = rng.random(tokens.shape)
    random_bytes = rng.integers(0, NUM_BYTES, tokens.shape, dtype=np.int32)
    inputs = tokens.copy()
    to_mask = selected & (action < rates.mask_token)
    to_random = selected & (action >= rates.mask_token)
    to_random &= action < rates.mask_token + rates.random_token
    inputs[to_mask] = MASK_ID
    inputs[to_random] = random_bytes[to_random]
    return {
        "inputs": inputs.astype(np.int32),
        "targets": tokens.astype(np.int32),
        "weights": selected.astype(np.float32),
        "valid": valid,
    }


def _mask_at(seed: int, rates: MaskingRates, index: int, tokens: np.ndarray) -> dict:
    return mask_row(tokens, np.random.default_rng([seed, index]), rates)


def check_corpus(data_config) -> pipeline.Corpus:
    """The corpus `data.name`, which must be one the MLM pipeline can hold in memory."""
    corpus = pipeline.get_corpus(data_config)
    if corpus.streaming:
        in_memory = [name for name, c in pipeline.CORPORA.items() if not c.streaming]
        raise ValueError(
            f"data.name={data_config.name!r} is a streaming corpus; the MLM pipeline packs a "
            f"split in memory: use one of {', '.join(in_memory)}"
        )
    return corpus


@functools.lru_cache(maxsize=8)
def _split_rows(name: str, data_dir: str | None, split: str, seq_len: int) -> np.ndarray:
    corpus = pipeline.CORPORA[name]
    records = corpus.data_source(split, data_dir)
    documents = [
        pipeline.encode_document(records[i], corpus.text_feature) for i in range(len(records))
    ]
    return pack_rows(documents, seq_len)


def split_rows(data_config, split: str, seq_len: int) -> np.ndarray:
    """The packed, padded (N, seq_len) rows of `split` (cached per process)."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    corpus = check_corpus(data_config)
    if split.split("[")[0] not in corpus.splits:
        raise ValueError(
            f"split={split!r} does not exist for data.name={data_config.name!r}; "
            f"accepted splits: {list(corpus.splits)}"
        )
    return _split_rows(data_config.name, data_config.get("data_dir"), split, seq_len)


def unigram_log_probs(data_config, seq_len: int) -> np.ndarray:
    """(VOCAB_SIZE,) log frequencies of the valid training tokens (add-one smoothed over the
    256 bytes; the special tokens get probability 0): the unigram baseline."""
    rows = split_rows(data_config, "train", seq_len)
    counts = np.bincount(rows[rows != PAD_ID], minlength=VOCAB_SIZE).astype(np.float64)
    counts[:NUM_BYTES] += 1.0
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum()).astype(np.float32)


def make_mlm_iterator(
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
    """This process's iterator of MLM batches (see the module docstring).

    Args: as :func:`pipeline.make_lm_iterator`; `data_config` also gives ``mask_rate``,
    ``mask_token_rate`` and ``random_token_rate``.

    Returns:
      A grain ``DatasetIterator`` of ``{'inputs', 'targets'}`` (int32), ``'weights'``
      (float32) and ``'valid'`` (bool), each ``[global_batch_size // process_count,
      seq_len]``; eval drops the last incomplete global batch.
    """
    rates = masking_rates(data_config)
    process_index, process_count = pipeline._resolve_processes(process_index, process_count)
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}"
        )
    rows = split_rows(data_config, split, seq_len)
    if len(rows) == 0:
        raise ValueError(
            f"split={split!r} of data.name={data_config.name!r} is empty (0 documents); use a "
            f"non-empty split of {list(pipeline.get_corpus(data_config).splits)}"
        )
    if not repeat and len(rows) < global_batch_size:
        raise ValueError(
            f"train.batch_size={global_batch_size} is larger than the {len(rows)} rows of "
            f"split={split!r} at train.seq_len={seq_len}: one pass would yield no batch; use "
            f"train.batch_size <= {len(rows)}"
        )
    examples = grain.MapDataset.source(rows)
    if shuffle:
        examples = examples.shuffle(pipeline.shuffle_seed(seed))
    if repeat:
        examples = examples.repeat()
    examples = examples.map_with_index(functools.partial(_mask_at, seed, rates))
    batches = examples.batch(global_batch_size, drop_remainder=True)
    local = global_batch_size // process_count
    start, stop = process_index * local, (process_index + 1) * local
    batches = batches.map(lambda b: {k: v[start:stop] for k, v in b.items()})
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def masking_rates(data_config) -> MaskingRates:
    """The masking rates of `data_config` (defaults 0.15 / 0.8 / 0.1), validated."""
    defaults = MaskingRates()
    values = {
        name: data_config.get(name, default)
        for name, default in (
            ("mask_rate", defaults.mask_rate),
            ("mask_token_rate", defaults.mask_token),
            ("random_token_rate", defaults.random_token),
        )
    }
    for name, value in values.items():
        check_number(value, f"data.{name}", 0, 1)
    rates = MaskingRates(*(float(v) for v in values.values()))
    rates.validate()
    return rates
