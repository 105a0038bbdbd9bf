"""Next-token language modelling (`task = "lm"`): a decoder LM on windows of a byte stream.

Loss: mean token cross-entropy in nats. Eval: the same loss over the split and bits per byte
(nats / ln 2; a uniform byte model scores 8).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from deepscale_jax import data as data_lib
from deepscale_jax.metrics import nats_to_bits, token_cross_entropy
from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models import build_model
from deepscale_jax.schemes.base import Scheme
from deepscale_jax.tasks.base import Batch, Task, check_seq_len


class LanguageModelTask(Task):
    name = "lm"

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict, model: ModelConfig) -> None:
        check_seq_len(config, model)
        vocab = data_lib.lm_vocab_size(config.data)
        if model.vocab_size < vocab:
            raise ValueError(
                f"model.vocab_size={model.vocab_size} is smaller than the {vocab} tokens of "
                f"data.name={config.data.name!r}"
            )

    def build_model(self, model: ModelConfig, scheme: Scheme):
        return build_model("lm", model, scheme)

    def init_inputs(self) -> tuple[jax.Array, ...]:
        return (jnp.zeros((1, self.config.train.seq_len), jnp.int32),)

    def token_sample(self) -> np.ndarray:
        return np.asarray(next(iter(self.iterator("train", training=True)))["inputs"])

    def iterator(self, split: str, training: bool) -> Any:
        train = self.config.train
        return data_lib.make_lm_iterator(
            self.config.data,
            split=split,
            seq_len=train.seq_len,
            global_batch_size=train.batch_size,
            seed=train.seed,
            shuffle=training,
            repeat=training,
        )

    def loss(
        self, params: Any, batch: Batch, deterministic: bool, rngs: dict | None = None
    ) -> tuple[jax.Array, jax.Array]:
        logits = self.model.apply(
            {"params": params}, batch["inputs"], deterministic=deterministic, rngs=rngs
        )
        return token_cross_entropy(logits, batch["targets"], batch.get("weights"))

    def eval_stats(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        total, count = self.loss(params, batch, deterministic=True)
        return {"loss": total, "count": count}

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        loss = totals["loss"] / totals["count"]
        return {"loss": loss, "bits_per_byte": nats_to_bits(loss)}

    def units_per_step(self) -> int:
        return self.config.train.batch_size * self.config.train.seq_len
