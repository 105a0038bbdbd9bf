"""BERT-style encoder with a masked-LM head (Devlin et al. 2019): embeddings -> N bidirectional
layers -> (final norm) -> tied logits.

h_0 = Dropout(E[tokens] + P[positions]); h_N = Stack(h_0) with full (non-causal) attention in
which no query attends to a pad key: mask[b, q, k] = valid[b, k]. The layers are the decoder
layers of nn/block.py with that mask (an encoder layer is the same residual block, only the mask
differs). Pre-LN adds a final norm; logits are h_N E^T (tied, Press & Wolf 2017) or h_N W_head,
times the scheme's fixed `logit_scale()` (as in the LM).
Because every key mask hides the pads and positions are absolute, outputs at valid positions do
not depend on the pad tokens or on how many pads follow.
With `model.memory_tokens` > 0 the stack runs on [memory ; sequence] (models/memory.py) and
the memory rows are dropped before the logits.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models import trunk
from deepscale_jax.models.memory import memory_mask, prepend_memory, strip_memory
from deepscale_jax.nn.attention import MaskSpec
from deepscale_jax.schemes.base import Scheme


def check_encoder_only(cfg: ModelConfig, what: str) -> None:
    if cfg.architecture != "encoder_only":
        raise ValueError(f"the {what} is encoder-only; got model.architecture={cfg.architecture!r}")


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
        # Every query attends to exactly the valid keys (pad queries too: no empty softmax row).
        mask = None if valid is None else MaskSpec(kv_valid=valid)
        if cfg.memory_tokens:
            mask = memory_mask(valid, x.shape[0], x.shape[1], cfg, causal=False)
            x = prepend_memory(x, cfg, self.scheme)
        x = trunk.layer_stack(x, mask, cfg, self.scheme, deterministic, name="encoder")
        x = strip_memory(x, cfg)
        return trunk.vocab_logits(x, embed, cfg, self.scheme)
