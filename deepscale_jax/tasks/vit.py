"""Image classification with a ViT (`task = "vit"`).

Config: `config.vit` holds the model's image side (`patch_size`, `pool`); the image size,
channels and number of classes come from the dataset (data/images.py). Loss: mean softmax
cross-entropy of the labels. Eval: `loss` and `accuracy` over every example of the split
(the filler examples of the last batch have weight 0).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from deepscale_jax.data import images
from deepscale_jax.metrics import token_cross_entropy
from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models import ViTConfig, build_model
from deepscale_jax.schemes.base import Scheme
from deepscale_jax.tasks.base import Batch, Task
from deepscale_jax.validation import check_choice, check_int, is_int


def vit_config(config: ml_collections.ConfigDict) -> ViTConfig:
    """The ViTConfig of `config.vit` on the dataset of `config.data`, validated."""
    if "vit" not in config:
        raise ValueError("task='vit' needs a config.vit section (patch_size, pool)")
    spec = images.get_image_dataset(config.data)
    vit = ViTConfig(
        image_size=images.image_size(config.data),
        channels=spec.channels,
        patch_size=config.vit.patch_size,
        num_classes=spec.num_classes,
        pool=config.vit.pool,
    )
    vit.validate()
    return vit


class ImageClassificationTask(Task):
    name = "vit"
    unit = "examples"

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict, model: ModelConfig) -> None:
        spec = images.get_image_dataset(config.data)
        size = config.data.get("image_size")
        if size is not None:
            check_int(size, "data.image_size")
            patch = config.get("vit", {}).get("patch_size")
            if is_int(patch) and patch > 0 and size % patch:
                raise ValueError(
                    f"data.image_size={size} is not a multiple of vit.patch_size={patch}"
                )
        augment = config.data.get("augment")
        if augment is not None:
            check_choice(augment, "data.augment", images.AUGMENTATIONS)
        splits = config.data.get("eval_splits")
        if splits is not None:
            if isinstance(splits, str) or not splits:
                raise ValueError(
                    f"data.eval_splits={splits!r} must be a non-empty tuple of split names of "
                    f"data.name={config.data.name!r}: {', '.join(spec.splits)}"
                )
            for split in splits:
                check_choice(split, "data.eval_splits split", spec.splits)
        vit = vit_config(config)
        if model.max_len < vit.num_tokens:
            raise ValueError(
                f"model.max_len={model.max_len} is smaller than the {vit.num_tokens} tokens of "
                f"an image ({vit.num_patches} patches of {vit.patch_size}x{vit.patch_size}"
                f"{' + class token' if vit.pool == 'cls' else ''})"
            )

    def build_model(self, model: ModelConfig, scheme: Scheme):
        return build_model("vit", model, scheme, vit=vit_config(self.config))

    def init_inputs(self) -> tuple[jax.Array, ...]:
        vit = self.model.vit
        return (jnp.zeros((1, vit.image_size, vit.image_size, vit.channels), jnp.float32),)

    def iterator(self, split: str, training: bool) -> Any:
        return images.make_image_iterator(
            self.config.data,
            split=split,
            global_batch_size=self.config.train.batch_size,
            seed=self.config.train.seed,
            training=training,
        )

    def logits(self, params: Any, batch: Batch, deterministic: bool, rngs=None) -> jax.Array:
        return self.model.apply(
            {"params": params}, batch["image"], deterministic=deterministic, rngs=rngs
        )

    def loss(
        self, params: Any, batch: Batch, deterministic: bool, rngs: dict | None = None
    ) -> tuple[jax.Array, jax.Array]:
        logits = self.logits(params, batch, deterministic, rngs)
        return token_cross_entropy(logits, batch["label"], batch["weights"])

    def eval_stats(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
        logits = self.logits(params, batch, deterministic=True)
        total, count = token_cross_entropy(logits, batch["label"], batch["weights"])
        correct = (jnp.argmax(logits, axis=-1) == batch["label"]) * batch["weights"]
        return {"loss": total, "count": count, "correct": jnp.sum(correct)}

    def eval_metrics(self, totals: dict[str, float]) -> dict[str, float]:
        count = totals["count"]
        return {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count}

    def units_per_step(self) -> int:
        return self.config.train.batch_size
