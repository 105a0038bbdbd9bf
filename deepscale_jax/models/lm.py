"""Decoder-only language model: embeddings -> N decoder layers -> (final norm) -> logits.

h_0 = Dropout(E[tokens] + P[positions]); h_N = Stack(h_0) under a causal (and optional padding)
mask; Pre-LN adds a final norm (Xiong et al. 2020), Post-LN ends normalised already. Logits are
h_N E^T with a tied embedding, or h_N W_head with an untied one, times the scheme's fixed
`logit_scale()` (1 except for DeepScaleLM with tied embeddings).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn.attention import causal_mask, combine_masks, padding_mask
from deepscale_jax.nn.block import DecoderLayer
from deepscale_jax.nn.embed import PositionEmbed, TokenEmbed
from deepscale_jax.nn.initializers import LayerInit
from deepscale_jax.nn.linear import Dense
from deepscale_jax.nn.norms import make_norm
from deepscale_jax.nn.stack import LayerStack
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
        if cfg.architecture != "decoder_only":
            raise ValueError(f"the LM is decoder-only; got model.architecture={cfg.architecture!r}")
        dtype = jnp.dtype(cfg.dtype)
        outside = LayerInit(self.scheme)
        embed = TokenEmbed(
            cfg.vocab_size, cfg.d_model, outside.for_role("embed"), dtype, name="embed"
        )
        x = embed(tokens)
        x = PositionEmbed(
            cfg.max_len,
            cfg.position_embedding,
            outside.for_role("pos_embed"),
            dtype,
            name="pos_embed",
        )(x)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = self.perturb("embed_out", x)  # measurement hooks, no-ops in training
        self.sow("intermediates", "embed_out", x)

        mask = causal_mask(tokens.shape[1])
        if valid is not None:
            mask = combine_masks(mask, padding_mask(valid, valid))
        x = LayerStack(
            DecoderLayer,
            cfg,
            self.scheme,
            cfg.num_layers,
            cfg.scan_layers,
            cfg.remat_policy,
            deterministic,
            name="decoder",
        )(x, mask)
        if cfg.norm_placement == "pre":
            x = make_norm(cfg.norm, cfg.norm_eps, dtype, "final_norm")(x)
        if cfg.tie_embeddings:
            return scale_logits(embed.attend(x), self.scheme.logit_scale())
        logits = Dense(
            (cfg.vocab_size,),
            outside.for_role("head"),
            ("embed", "vocab"),
            use_bias=False,
            dtype=dtype,
            name="head",
        )(x)
        return scale_logits(logits.astype(jnp.float32), self.scheme.logit_scale())


def scale_logits(logits: jax.Array, scale: float) -> jax.Array:
    return logits if scale == 1.0 else logits * scale
