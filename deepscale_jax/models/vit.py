"""Vision Transformer (Dosovitskiy et al. 2021): patches -> linear embedding (+ class token)
+ learned positions -> N encoder layers -> (final norm) -> pool -> linear classifier.

An (H, W, C) image is cut into non-overlapping p x p patches, flattened row-major to
N = (H/p)(W/p) vectors of p^2 C pixels, and embedded as x_i = patch_i W_patch + b (eq. 1 of
the paper; weight role "patch_embed"). With pool="cls" a learned class token (role "embed":
it is one more token embedding) is prepended and its final state is classified; with
pool="gap" the final states are averaged (global average pooling, the paper's sec. 3.1 /
appendix D.3 alternative). Positions are a learned (or sinusoidal) table over the N (+1)
tokens (role "pos_embed"). The layers are nn/block.py's residual layers without a mask
(every patch sees every patch). Pre-LN ends with a final norm; the head has role "head".
With `model.memory_tokens` > 0 the stack runs on [memory ; tokens] (models/memory.py) and the
memory rows are dropped before pooling.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models import trunk
from deepscale_jax.models.memory import memory_mask, prepend_memory, strip_memory
from deepscale_jax.models.mlm import check_encoder_only
from deepscale_jax.nn.initializers import LayerInit
from deepscale_jax.nn.linear import Dense
from deepscale_jax.schemes.base import Scheme

POOLS = ("cls", "gap")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The image side of a ViT (the transformer's shape is the ModelConfig)."""

    image_size: int
    channels: int
    patch_size: int
    num_classes: int
    pool: str = "cls"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (self.pool == "cls")

    def validate(self) -> None:
        for name in ("image_size", "channels", "patch_size", "num_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"vit.{name}={value!r} must be a positive integer")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"vit.patch_size={self.patch_size} does not divide the image size {self.image_size}"
            )
        if self.pool not in POOLS:
            raise ValueError(f"unknown vit.pool={self.pool!r}; accepted: {', '.join(POOLS)}")


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, (H/p)(W/p), p*p*C), patches in row-major order."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class ViT(nn.Module):
    config: ModelConfig
    scheme: Scheme
    vit: ViTConfig

    @nn.compact
    def __call__(self, images: jax.Array, *, deterministic: bool = True) -> jax.Array:
        """Class logits (B, num_classes) in float32 for images (B, H, W, C)."""
        cfg, vit = self.config, self.vit
        check_encoder_only(cfg, "ViT")
        dtype = jnp.dtype(cfg.dtype)
        outside = LayerInit(self.scheme)
        x = Dense(
            (cfg.d_model,),
            outside.for_role("patch_embed"),
            ("patch", "embed"),
            use_bias=True,
            dtype=dtype,
            name="patch_embed",
        )(patchify(images.astype(dtype), vit.patch_size))
        if vit.pool == "cls":
            cls = self.param(
                "cls",
                nn.with_logical_partitioning(outside.for_role("embed"), (None, None, "embed")),
                (1, 1, cfg.d_model),
                jnp.float32,
            )
            x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[2])), x], axis=1)
        x = trunk.add_positions(x.astype(dtype), cfg, self.scheme)
        x = trunk.stack_input(self, x, cfg, deterministic)
        mask = None
        if cfg.memory_tokens:
            mask = memory_mask(None, x.shape[0], x.shape[1], cfg, causal=False)
            x = prepend_memory(x, cfg, self.scheme)
        x = trunk.layer_stack(x, mask, cfg, self.scheme, deterministic, name="encoder")
        x = strip_memory(x, cfg)
        pooled = x[:, 0] if vit.pool == "cls" else jnp.mean(x, axis=1)
        logits = Dense(
            (vit.num_classes,),
            outside.for_role("head"),
            ("embed", "classes"),
            use_bias=True,
            dtype=dtype,
            name="head",
        )(pooled)
        return logits.astype(jnp.float32)
