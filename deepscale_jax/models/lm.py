"""Decoder-only language model: embeddings -> N decoder layers -> (final norm) -> logits.

h_0 = Dropout(E[tokens] + P[positions]); h_N = Stack(h_0) under a causal (and optional padding)
mask; Pre-LN adds a final norm (Xiong et al. 2020), Post-LN ends normalised already. Logits are
h_N E^T with a tied embedding, or h_N W_head with an untied one, times the scheme's fixed
`logit_scale()` (1 except for DeepScaleLM with tied embeddings).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models import trunk
from deepscale_jax.nn.attention import causal_mask, combine_masks, padding_mask
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
        mask = causal_mask(tokens.shape[1])
        if valid is not None:
            mask = combine_masks(mask, padding_mask(valid, valid))
        x = trunk.layer_stack(x, mask, cfg, self.scheme, deterministic, name="decoder")
        return trunk.vocab_logits(x, embed, cfg, self.scheme)
