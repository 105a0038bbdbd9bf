"""Decoder-only language model: embeddings -> N decoder layers -> (final norm) -> logits.

h_0 = Dropout(E[tokens] + P[positions]); h_N = Stack(h_0) under a causal (and optional padding)
mask; Pre-LN adds a final norm (Xiong et al. 2020), Post-LN ends normalised already. Logits are
h_N E^T with a tied embedding, or h_N W_head with an untied one, times the scheme's fixed
`logit_scale()` (1 except for DeepScaleLM with tied embeddings).
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


class DecoderLM(nn.Module):
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
        x, embed = trunk.embed_tokens(tokens, cfg, self.scheme)
        x = trunk.stack_input(self, x, cfg, deterministic)
        mask = MaskSpec(kv_valid=valid, causal=True)  # every attention kernel takes it
        if cfg.memory_tokens:
            mask = memory_mask(valid, *tokens.shape, cfg, causal=True)
            x = prepend_memory(x, cfg, self.scheme)
        x = trunk.layer_stack(x, mask, cfg, self.scheme, deterministic, name="decoder")
        x = strip_memory(x, cfg)
        return trunk.vocab_logits(x, embed, cfg, self.scheme)
