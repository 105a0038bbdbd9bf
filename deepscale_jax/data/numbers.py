"""German number words -> English number words, generated offline with `num2words`.

A real transduction with reordering ("einundzwanzig" -> "twenty-one": the German units come
before the tens), the default seq2seq data set (issue 5).

Numbers: a permutation of 0..`max_number` drawn with `numpy.random.default_rng(split_seed)`;
its first `validation_size` numbers are the validation split, the next `test_size` the test
split, and the next `train_size` (all the rest if 0) the training split. The splits are
disjoint BY NUMBER, so every test number is unseen in training.

Vocabulary: the 256 UTF-8 bytes, then :data:`PAD_ID` = 256, :data:`BOS_ID` = 257,
:data:`EOS_ID` = 258 (:data:`VOCAB_SIZE` = 259); source and target share it. One example:
    inputs         = bytes(german) + [EOS], padded with PAD to `src_len`
    decoder_inputs = [BOS] + bytes(english), padded to `tgt_len`
    targets        = bytes(english) + [EOS], padded to `tgt_len`
with `inputs_valid`, `targets_valid` (bool, non-pad) and `weights` (float32, 1 on targets).

Iterator: a grain ``MapDataset`` of the split's numbers (shuffled per epoch and repeated when
training), mapped to examples, batched; its state (the next batch index) is JSON-serialisable
and restores the exact stream, as in the other pipelines.
"""

from __future__ import annotations

import functools

import grain
import numpy as np
from num2words import num2words

from deepscale_jax.data import pipeline

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
VOCAB_SIZE = 259
SPLITS = ("train", "validation", "test")
DEFAULTS = {
    "max_number": 999_999,
    "split_seed": 0,
    "validation_size": 1000,
    "test_size": 1000,
    "train_size": 0,
    "src_len": 80,
    "tgt_len": 80,
}


def option(data_config, name: str) -> int:
    return int(data_config.get(name, DEFAULTS[name]))


def german(number: int) -> str:
    return num2words(int(number), lang="de")


def english(number: int) -> str:
    return num2words(int(number), lang="en")


@functools.lru_cache(maxsize=8)
def _split_numbers(max_number: int, seed: int, val: int, test: int, train: int) -> dict:
    order = np.random.default_rng(seed).permutation(max_number + 1).astype(np.int64)
    if val + test + max(train, 1) > len(order):
        raise ValueError(
            f"data.validation_size={val} + data.test_size={test} + data.train_size={train} "
            f"exceed the {len(order)} numbers 0..data.max_number={max_number}"
        )
    rest = order[val + test :]
    return {
        "validation": order[:val],
        "test": order[val : val + test],
        "train": rest[:train] if train else rest,
    }


def split_numbers(data_config, split: str) -> np.ndarray:
    """The numbers of `split` (disjoint between splits)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} does not exist; accepted splits: {list(SPLITS)}")
    return _split_numbers(
        option(data_config, "max_number"),
        option(data_config, "split_seed"),
        option(data_config, "validation_size"),
        option(data_config, "test_size"),
        option(data_config, "train_size"),
    )[split]


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(ids) -> str:
    """Text of the bytes before the first EOS/PAD (special ids dropped)."""
    out = bytearray()
    for i in np.asarray(ids).tolist():
        if i in (EOS_ID, PAD_ID):
            break
        if i < 256:
            out.append(i)
    return out.decode("utf-8", errors="replace")


def _padded(tokens: np.ndarray, length: int, what: str, number: int) -> np.ndarray:
    if len(tokens) > length:
        raise ValueError(
            f"the {what} of {number} has {len(tokens)} tokens > data.{what}_len={length}"
        )
    out = np.full((length,), PAD_ID, np.int32)
    out[: len(tokens)] = tokens
    return out


def make_example(number: int, src_len: int, tgt_len: int) -> dict[str, np.ndarray]:
    """One example (see the module docstring) for `number`."""
    src = np.append(encode(german(number)), EOS_ID)
    tgt = encode(english(number))
    inputs = _padded(src, src_len, "src", number)
    decoder_inputs = _padded(np.insert(tgt, 0, BOS_ID), tgt_len, "tgt", number)
    targets = _padded(np.append(tgt, EOS_ID), tgt_len, "tgt", number)
    return {
        "inputs": inputs,
        "inputs_valid": inputs != PAD_ID,
        "decoder_inputs": decoder_inputs,
        "targets": targets,
        "targets_valid": targets != PAD_ID,
        "weights": (targets != PAD_ID).astype(np.float32),
    }


def make_numbers_iterator(
    data_config,
    *,
    split: str,
    global_batch_size: int,
    seed: int,
    shuffle: bool,
    repeat: bool,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """This process's iterator of translation batches, each field
    [global_batch_size // process_count, src_len or tgt_len]; eval drops the last incomplete
    global batch."""
    process_index, process_count = pipeline._resolve_processes(process_index, process_count)
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}"
        )
    numbers = split_numbers(data_config, split)
    if not repeat and len(numbers) < global_batch_size:
        raise ValueError(
            f"global_batch_size={global_batch_size} is larger than the {len(numbers)} "
            f"examples of split={split!r}; one pass would yield no batch"
        )
    src_len, tgt_len = option(data_config, "src_len"), option(data_config, "tgt_len")
    examples = grain.MapDataset.source(numbers)
    if shuffle:
        examples = examples.shuffle(pipeline.shuffle_seed(seed))
    if repeat:
        examples = examples.repeat()
    examples = examples.map(functools.partial(_example, src_len=src_len, tgt_len=tgt_len))
    batches = examples.batch(global_batch_size, drop_remainder=True)
    local = global_batch_size // process_count
    start, stop = process_index * local, (process_index + 1) * local
    batches = batches.map(lambda b: {k: v[start:stop] for k, v in b.items()})
    return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))


def _example(number, src_len: int, tgt_len: int) -> dict[str, np.ndarray]:
    return make_example(int(number), src_len, tgt_len)
