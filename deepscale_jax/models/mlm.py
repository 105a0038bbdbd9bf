"""BERT-style encoder with a masked-LM head (Devlin et al. 2019): embeddings -> N bidirectional
layers -> (final norm) -> tied logits.

h_0 = Dropout(E[tokens] + P[positions]); h_N = Stack(h_0) with full (non-causal) attention in
which no query attends to a pad key: mask[b, q, k] = valid[b, k]. The layers are the decoder
layers of nn/block.py with that mask (an encoder layer is the same residual block, only the mask
differs). Pre-LN adds a final norm; logits are h_N E^T (tied, Press & Wolf 2017) or h_N W_head,
times the scheme's fixed `logit_scale()` (as in the LM).
Because every key mask hides the pads and positions are absolute, outputs at valid positions do
not depend on the pad tokens or on how many pads follow.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models import trunk
from deepscale_jax.nn.attention import padding_mask
from deepscale_jax.schemes.base import Scheme


def check_encoder_only(cfg: ModelConfig, what: str) -> None:
    if cfg.architecture != "encoder_only":
        raise ValueError(f"the {what} is encoder-only; got model.architecture={cfg.architecture!r}")


def key_padding_mask(valid: jax.Array) -> jax.Array:
    """(B, 1, T, T): every query may attend to exactly the valid keys. Pad queries keep valid
    keys too, so no softmax row is empty."""
    return padding_mask(jnp.ones_like(valid, bool), valid.astype(bool))


class EncoderMLM(nn.Module):
    config: ModelConfig
    scheme: Scheme

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        valid: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        """Logits (B, T, vocab) in float32 for int tokens (B, T); `valid` marks non-pad tokens."""
        cfg = self.config
        check_encoder_only(cfg, "MLM")
        x, embed = trunk.embed_tokens(tokens, cfg, self.scheme)
        x = trunk.stack_input(self, x, cfg, deterministic)
        mask = None if valid is None else key_padding_mask(valid)
        x = trunk.layer_stack(x, mask, cfg, self.scheme, deterministic, name="encoder")
        return trunk.vocab_logits(x, embed, cfg, self.scheme)
