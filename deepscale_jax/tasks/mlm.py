"""Masked language modelling (`task = "mlm"`): a BERT-style encoder on packed, padded rows of
a byte corpus, 15% of the tokens selected for prediction (data/mlm.py).

Loss: cross-entropy over the selected tokens only (Devlin et al. 2019, sec. 3.1). Eval, over
the selected tokens of the split: `loss`, `accuracy` (argmax == original token), and the
unigram baseline that ignores the context: `unigram_accuracy` (always predict the most frequent
training byte) and `unigram_loss` (cross-entropy of the training unigram distribution).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deepscale_jax.data import mlm as mlm_data
from deepscale_jax.metrics import token_cross_entropy
from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models import build_model
from deepscale_jax.schemes.base import Scheme
from deepscale_jax.tasks.base import Batch, Task, check_seq_len


class MaskedLanguageModelTask(Task):
    name = "mlm"

    def __init__(
        self, config: ml_collections.ConfigDict, model: ModelConfig, scheme: Scheme
    ) -> None:
        super().__init__(config, model, scheme)
        log_probs = mlm_data.unigram_log_probs(config.data, config.train.seq_len)
        self.unigram_log_probs = log_probs
        self.unigram_mode = int(np.argmax(log_probs))

    def token_sample(self) -> np.ndarray:
        """The unmasked text of a training batch."""
        return np.asarray(next(iter(self.iterator("train", training=True)))["targets"])

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict, model: ModelConfig) -> None:
        check_seq_len(config, model)
        if model.vocab_size != mlm_data.VOCAB_SIZE:
            raise ValueError(
                f"model.vocab_size={model.vocab_size} must be {mlm_data.VOCAB_SIZE} for the "
                "MLM: 256 bytes + [PAD] + [MASK]"
            )
        mlm_data.check_corpus(config.data)
        mlm_data.masking_rates(config.data)

    def build_model(self, model: ModelConfig, scheme: Scheme):
        return build_model("mlm", model, scheme)

    def init_inputs(self) -> tuple[jax.Array, ...]:
        shape = (1, self.config.train.seq_len)
        return jnp.zeros(shape, jnp.int32), jnp.ones(shape, bool)

    def iterator(self, split: str, training: bool) -> Any:
        train = self.config.train
        return mlm_data.make_mlm_iterator(
            self.config.data,
            split=split,
            seq_len=train.seq_len,
            global_batch_size=train.batch_size,
            seed=train.seed,
            shuffle=training,
            repeat=training,
        )

    def logits(self, params: Any, batch: Batch, deterministic: bool, rngs=None) -> jax.Array:
        return self.model.apply(
            {"params": params},
            batch["inputs"],
            batch["valid"],
            deterministic=deterministic,
            rngs=rngs,
        )

    def loss(
        self, params: Any, batch: Batch, deterministic: bool, rngs: dict | None = None
    ) -> tuple[jax.Array, jax.Array]:
        logits = self.logits(params, batch, deterministic, rngs)
        return token_cross_entropy(logits, batch["targets"], batch["weights"])

    def eval_stats(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        logits = self.logits(params, batch, deterministic=True)
        targets, weights = batch["targets"], batch["weights"]
        total, count = token_cross_entropy(logits, targets, weights)
        correct = (jnp.argmax(logits, axis=-1) == targets) * weights
        unigram = jnp.asarray(self.unigram_log_probs)
        return {
            "loss": total,
            "count": count,
            "correct": jnp.sum(correct),
            "unigram_correct": jnp.sum((targets == self.unigram_mode) * weights),
            "unigram_loss": -jnp.sum(jnp.where(weights > 0, unigram[targets], 0.0) * weights),
        }

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        count = totals["count"]
        return {
            "loss": totals["loss"] / count,
            "accuracy": totals["correct"] / count,
            "unigram_accuracy": totals["unigram_correct"] / count,
            "unigram_loss": totals["unigram_loss"] / count,
            "masked_tokens": count,
        }

    def units_per_step(self) -> int:
        return self.config.train.batch_size * self.config.train.seq_len
