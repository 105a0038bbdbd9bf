"""German number words -> English number words, generated offline with `num2words`.

A real transduction with reordering ("einundzwanzig" -> "twenty-one": the German units come
before the tens), the default seq2seq data set (issue 5).

Numbers: a permutation of 0..`max_number` drawn with `numpy.random.default_rng(split_seed)`;
its first `validation_size` numbers are the validation split, the next `test_size` the test
split, and the next `train_size` (all the rest if 0) the training split. The splits are
disjoint BY NUMBER, so every test number is unseen in training.

Vocabulary: `translation.ByteVocabulary` (the 256 UTF-8 bytes, then PAD, BOS, EOS), shared
by source and target; examples and batches as in data/translation.py.

Iterator: a grain ``MapDataset`` of the split's numbers mapped to (German, English) pairs, then
`translation.make_translation_iterator`.
"""

from __future__ import annotations

import functools

import grain
import numpy as np
from num2words import num2words

from deepscale_jax.data import translation
from deepscale_jax.validation import check_int

VOCAB = translation.ByteVocabulary()
VOCAB_SIZE = VOCAB.vocab_size
SPLITS = ("train", "validation", "test")
DEFAULTS = {
    "max_number": 999_999,
    "split_seed": 0,
    "validation_size": 1000,
    "test_size": 1000,
    "train_size": 0,
    "src_len": 72,  # the longest German number word is 67 bytes (+ EOS)
    "tgt_len": 76,  # the longest English one 73 (+ EOS or BOS)
}


#: The smallest accepted value of each option (all are integers).
MINIMUMS = {
    "max_number": 1,
    "split_seed": 0,
    "validation_size": 0,
    "test_size": 0,
    "train_size": 0,
    "src_len": 2,
    "tgt_len": 2,
}


def option(data_config, name: str) -> int:
    return int(data_config.get(name, DEFAULTS[name]))


def check_options(data_config) -> None:
    """Each of this data set's options that `data_config` sets is an integer >= its minimum
    (`data.train_size=0`: all the numbers left)."""
    for name, minimum in MINIMUMS.items():
        if name in data_config:
            check_int(data_config[name], f"data.{name}", minimum=minimum)


def validate(data_config) -> None:
    """The options (`check_options`) and the split sizes fit 0..data.max_number."""
    check_options(data_config)
    sizes = {n: option(data_config, n) for n in ("validation_size", "test_size", "train_size")}
    available = option(data_config, "max_number") + 1
    if sizes["validation_size"] + sizes["test_size"] + max(sizes["train_size"], 1) > available:
        raise ValueError(
            f"data.validation_size={sizes['validation_size']} + data.test_size="
            f"{sizes['test_size']} + data.train_size={sizes['train_size']} exceed the "
            f"{available} numbers 0..data.max_number={available - 1}; lower the sizes or raise "
            "data.max_number"
        )


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


def vocabulary(data_config=None) -> translation.ByteVocabulary:
    """The byte vocabulary (the same for every option)."""
    del data_config
    return VOCAB


def make_example(number: int, src_len: int, tgt_len: int) -> dict[str, np.ndarray]:
    """The example of `number` (data/translation.py `make_example`)."""
    return translation.make_example(german(number), english(number), VOCAB, src_len, tgt_len, False)


def make_iterator(
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
    """This process's iterator of translation batches of `split` (data/translation.py)."""
    numbers = split_numbers(data_config, split)
    if len(numbers) == 0:
        raise ValueError(
            f"split={split!r} of data.name='numbers' is empty (data.{split}_size=0); set "
            f"data.{split}_size > 0 or leave {split!r} out of data.eval_splits"
        )
    pairs = grain.MapDataset.source(numbers).map(_pair)
    return translation.make_translation_iterator(
        pairs,
        VOCAB,
        src_len=option(data_config, "src_len"),
        tgt_len=option(data_config, "tgt_len"),
        global_batch_size=global_batch_size,
        seed=seed,
        shuffle=shuffle,
        repeat=repeat,
        split=split,
        process_index=process_index,
        process_count=process_count,
    )


def _pair(number) -> tuple[str, str]:
    return german(int(number)), english(int(number))
