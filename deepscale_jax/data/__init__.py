"""Data layer: TFDS sources read without TensorFlow, byte tokenizer, grain pipelines.

Public API::

    make_lm_iterator(data_config, *, split, seq_len, global_batch_size, seed, shuffle,
                     repeat, process_index=None, process_count=None) -> DatasetIterator
    lm_vocab_size(data_config) -> int
    ByteTokenizer().encode(str) -> int32 array; .decode(ids) -> str
    prepare_shakespeare(data_dir) -> ShakespearePlays builder (ArrayRecord, built once)
    mlm.make_mlm_iterator(...)      masked-LM batches (data/mlm.py)
    images.make_image_iterator(...) image-classification batches: digits, cifar10,
                                    imagenet2012 (data/images.py)
"""

from deepscale_jax.data.pipeline import CORPORA, lm_vocab_size, make_lm_iterator
from deepscale_jax.data.shakespeare import ShakespearePlays, prepare_shakespeare
from deepscale_jax.data.tokenizers import ByteTokenizer

__all__ = [
    "CORPORA",
    "ByteTokenizer",
    "ShakespearePlays",
    "lm_vocab_size",
    "make_lm_iterator",
    "prepare_shakespeare",
]
