"""Sequence-to-sequence translation (`task = "seq2seq"`) with the encoder-decoder Transformer
(models/seq2seq.py). Data (`data.name`, `TRANSLATION_DATA`): "numbers", German number words ->
English number words (data/numbers.py, the offline default), or the real "wmt14_translate" /
"wmt17_translate" de-en with a SentencePiece vocabulary (data/wmt.py).

Loss (training): label-smoothed cross-entropy over the target tokens (Szegedy et al. 2016;
Vaswani et al. 2017 sec. 5.4, eps_ls = `seq2seq.label_smoothing` = 0.1):
    q = (1 - eps) onehot(y) + eps / V,   loss = -sum_v q_v log p_v.
Eval, per split over its first `train.eval_batches` batches (a fixed set of examples: eval
iterators are unshuffled):
- `loss`: the plain (unsmoothed) cross-entropy in nats per target token; `accuracy`: teacher-
  forced token accuracy (argmax == target, EOS included);
- from decoding (decode.py, KV cache, up to data.tgt_len tokens; `seq2seq.eval_decode` =
  "greedy", or "beam" with `seq2seq.beam_size` and the length penalty `seq2seq.length_penalty`,
  Vaswani et al. sec. 6.1: 4 and 0.6): `exact_match`, the
  fraction of sentences whose decoded text equals the reference, and `bleu`, corpus BLEU of
  sacrebleu (default 13a tokenisation, exp smoothing) computed from its sufficient statistics
  (n-gram matches/totals, hypothesis/reference lengths), which add up over batches; the text
  is decoded on the host inside the jitted eval step through `jax.pure_callback`.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from sacrebleu.metrics import BLEU

from deepscale_jax.data import numbers, wmt
from deepscale_jax.data.translation import Vocabulary
from deepscale_jax.decode import SpecialIds, beam_search, greedy_decode
from deepscale_jax.metrics import token_cross_entropy
from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models import Seq2SeqConfig, build_model
from deepscale_jax.models.seq2seq import check_encoder_decoder
from deepscale_jax.schemes.base import Scheme
from deepscale_jax.tasks.base import Batch, Task
from deepscale_jax.validation import check_bool, check_choice, check_int, check_number

BLEU_STATS = 10  # 4 n-gram match counts, 4 n-gram totals, hypothesis length, reference length
# data.name -> the module with option(), vocabulary(), DEFAULTS and the batch iterator.
TRANSLATION_DATA: dict[str, ModuleType] = {
    "numbers": numbers,
    **{name: wmt for name in wmt.DATASETS},
}
EVAL_DECODES = ("greedy", "beam")


def data_module(config: ml_collections.ConfigDict) -> ModuleType:
    return TRANSLATION_DATA[check_choice(config.data.name, "data.name", TRANSLATION_DATA)]


def bleu_statistics(predictions: np.ndarray, targets: np.ndarray, vocab: Vocabulary) -> np.ndarray:
    """(10,) float32 sacrebleu sufficient statistics of decoded token rows vs reference rows."""
    hyps = [vocab.decode(row) for row in np.asarray(predictions)]
    refs = [vocab.decode(row) for row in np.asarray(targets)]
    score = BLEU().corpus_score(hyps, [refs])
    stats = [*score.counts, *score.totals, score.sys_len, score.ref_len]
    return np.asarray(stats, np.float32)


def bleu_from_statistics(stats) -> float:
    """Corpus BLEU (0..100) from summed `bleu_statistics` (sacrebleu's exp smoothing)."""
    stats = [round(float(s)) for s in stats]
    return BLEU.compute_bleu(stats[:4], stats[4:8], stats[8], stats[9], smooth_method="exp").score


def seq2seq_config(config: ml_collections.ConfigDict) -> Seq2SeqConfig:
    section = config.get("seq2seq") or {}
    return Seq2SeqConfig(
        scale_embeddings=bool(section.get("scale_embeddings", False)),
    )


class Seq2SeqTask(Task):
    name = "seq2seq"
    default_eval_splits = ("validation", "test")

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict, model: ModelConfig) -> None:
        check_encoder_decoder(model)
        data = data_module(config)
        for module in (numbers, wmt):  # the section holds both modules' fields
            module.check_options(config.data)
        data.validate(config.data)
        if data is numbers and model.vocab_size != numbers.VOCAB_SIZE:
            raise ValueError(
                f"model.vocab_size={model.vocab_size} must be {numbers.VOCAB_SIZE}: 256 bytes "
                "+ PAD + BOS + EOS"
            )
        if data is wmt and model.vocab_size != wmt.option(config.data, "vocab_size"):
            raise ValueError(
                f"model.vocab_size={model.vocab_size} must equal the SentencePiece "
                f"data.vocab_size={wmt.option(config.data, 'vocab_size')}"
            )
        for name in ("src_len", "tgt_len"):
            length = data.option(config.data, name)
            if length > model.max_len:
                raise ValueError(
                    f"data.{name}={length} is longer than the position table "
                    f"model.max_len={model.max_len}"
                )
        if "seq2seq" not in config:
            raise ValueError("task='seq2seq' needs a config.seq2seq section (configs/seq2seq.py)")
        section = config.seq2seq
        check_bool(section.get("scale_embeddings"), "seq2seq.scale_embeddings")
        check_number(
            section.get("label_smoothing"), "seq2seq.label_smoothing", 0, 1, high_open=True
        )
        check_choice(section.get("eval_decode"), "seq2seq.eval_decode", EVAL_DECODES)
        check_int(section.get("beam_size"), "seq2seq.beam_size")
        check_number(section.get("length_penalty"), "seq2seq.length_penalty", 0)

    def build_model(self, model: ModelConfig, scheme: Scheme):
        return build_model("seq2seq", model, scheme, seq2seq=seq2seq_config(self.config))

    @property
    def data(self) -> ModuleType:
        return data_module(self.config)

    @functools.cached_property
    def vocab(self) -> Vocabulary:
        """The data's vocabulary (for WMT loaded, or trained once, on first use)."""
        vocab = self.data.vocabulary(self.config.data)
        if vocab.vocab_size > self.model.config.vocab_size:
            raise ValueError(
                f"the vocabulary has {vocab.vocab_size} ids > model.vocab_size="
                f"{self.model.config.vocab_size}"
            )
        return vocab

    @property
    def src_len(self) -> int:
        return self.data.option(self.config.data, "src_len")

    @property
    def tgt_len(self) -> int:
        return self.data.option(self.config.data, "tgt_len")

    def init_inputs(self) -> tuple[jax.Array, ...]:
        return (
            jnp.zeros((1, self.src_len), jnp.int32),
            jnp.ones((1, self.src_len), bool),
            jnp.zeros((1, self.tgt_len), jnp.int32),
        )

    def iterator(self, split: str, training: bool) -> Any:
        train = self.config.train
        return self.data.make_iterator(
            self.config.data,
            split=split,
            global_batch_size=train.batch_size,
            seed=train.seed,
            shuffle=training,
            repeat=training,
        )

    def logits(self, params: Any, batch: Batch, deterministic: bool, rngs=None) -> jax.Array:
        model = self.model.clone(deterministic=deterministic)
        return model.apply(
            {"params": params},
            batch["inputs"],
            batch["inputs_valid"],
            batch["decoder_inputs"],
            batch["targets_valid"],
            rngs=rngs,
        )

    def loss(
        self, params: Any, batch: Batch, deterministic: bool, rngs: dict | None = None
    ) -> tuple[jax.Array, jax.Array]:
        logits = self.logits(params, batch, deterministic, rngs)
        eps = float(self.config.seq2seq.label_smoothing)
        vocab = logits.shape[-1]
        smoothed = optax.smooth_labels(jax.nn.one_hot(batch["targets"], vocab), eps)
        losses = optax.softmax_cross_entropy(logits, smoothed)
        weights = batch["weights"]
        return jnp.sum(losses * weights), jnp.sum(weights)

    def eval_stats(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        logits = self.logits(params, batch, deterministic=True)
        targets, weights = batch["targets"], batch["weights"]
        total, count = token_cross_entropy(logits, targets, weights)
        correct = (jnp.argmax(logits, axis=-1) == targets) * weights
        decoded = self.decode(params, batch["inputs"], batch["inputs_valid"])
        same = jnp.all(decoded == targets, axis=-1)  # both PAD after EOS
        stats = jax.pure_callback(
            functools.partial(bleu_statistics, vocab=self.vocab),
            jax.ShapeDtypeStruct((BLEU_STATS,), jnp.float32),
            decoded,
            targets,
        )
        out = {
            "loss": total,
            "count": count,
            "correct": jnp.sum(correct),
            "sentences": jnp.asarray(targets.shape[0], jnp.float32),
            "exact": jnp.sum(same.astype(jnp.float32)),
        }
        out.update({f"bleu_stat_{i}": stats[i] for i in range(BLEU_STATS)})
        return out

    def decode(self, params: Any, inputs: jax.Array, inputs_valid: jax.Array) -> jax.Array:
        """(B, tgt_len) decoded ids (EOS, then PAD) by `seq2seq.eval_decode`."""
        section, ids = self.config.seq2seq, SpecialIds.of(self.vocab)
        if section.eval_decode == "greedy":
            return greedy_decode(self.model, params, inputs, inputs_valid, self.tgt_len, ids)
        return beam_search(
            self.model,
            params,
            inputs,
            inputs_valid,
            self.tgt_len,
            ids,
            beam_size=section.beam_size,
            alpha=section.length_penalty,
        )[0]

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        count = totals["count"]
        stats = [totals[f"bleu_stat_{i}"] for i in range(BLEU_STATS)]
        return {
            "loss": totals["loss"] / count,
            "accuracy": totals["correct"] / count,
            "exact_match": totals["exact"] / totals["sentences"],
            "bleu": bleu_from_statistics(stats),
            "sentences": totals["sentences"],
        }

    def units_per_step(self) -> int:
        return self.config.train.batch_size * self.tgt_len
