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
from deepscale_jax.models.lm import scale_logits
from deepscale_jax.nn.attention import padding_mask
from deepscale_jax.nn.block import DecoderLayer
from deepscale_jax.nn.embed import PositionEmbed, TokenEmbed
from deepscale_jax.nn.initializers import LayerInit
from deepscale_jax.nn.linear import Dense
from deepscale_jax.nn.norms import make_norm
from deepscale_jax.nn.stack import LayerStack
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
        dtype = jnp.dtype(cfg.dtype)
        outside = LayerInit(self.scheme)
        embed = TokenEmbed(
            cfg.vocab_size, cfg.d_model, outside.for_role("embed"), dtype, name="embed"
        )
        x = PositionEmbed(
            cfg.max_len,
            cfg.position_embedding,
            outside.for_role("pos_embed"),
            dtype,
            name="pos_embed",
        )(embed(tokens))
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = self.perturb("embed_out", x)
        self.sow("intermediates", "embed_out", x)

        mask = None if valid is None else key_padding_mask(valid)
        x = LayerStack(
            DecoderLayer,
            cfg,
            self.scheme,
            cfg.num_layers,
            cfg.scan_layers,
            cfg.remat_policy,
            deterministic,
            name="encoder",
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
