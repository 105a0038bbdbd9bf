"""Encoder-decoder Transformer (Vaswani et al. 2017, sec. 3; variants.md sec. 8), with the
MAtt decoder option (Zhang, Titov & Sennrich 2019; variants.md sec. 1.4).

- One token embedding E shared by source and target, and the tied softmax: logits = h E^T
  (Vaswani et al. sec. 3.4; Press & Wolf 2017), or an untied "head" if `tie_embeddings=False`;
  times the scheme's fixed `logit_scale()`. `Seq2SeqConfig.scale_embeddings` multiplies E[x] by
  sqrt(d_model) as in the paper (off by default: the schemes set the embedding std themselves).
  With `model.fix_norm` (FixNorm, Nguyen & Salazar 2019) the embedding itself gives
  sqrt(d) w_hat[x] and logits h w_hat^T (nn/embed.py): that sqrt(d) is the reference's one
  embedding scale (tnq177/transformers_without_tears multiplies the normalised rows by sqrt(d)
  once), so `scale_embeddings` adds no second factor under fix_norm.
- Positions as `model.position_embedding` says (sinusoidal PE(pos, 2i) = sin(pos/10000^(2i/d)),
  PE(pos, 2i+1) = cos(...) in the paper), one table for both sides.
- Encoder: `encoder_layers` bidirectional layers (nn/block.py `DecoderLayer` with a key padding
  mask: query i sees key j iff source token j is not a pad), scheme `scheme.for_stack("encoder")`
  so its layer indices count from 0 within the encoder. With `model.memory_tokens` m learned
  memory rows go in front of the source (models/memory.py) and the decoder reads them too.
- Decoder: `num_layers` layers of [causal self-attention][cross-attention][FFN]
  (`CrossDecoderLayer`), or with `model.merged_attention` the MAtt layers
  [averaged self-attention + cross-attention sharing W_v and W_o][FFN] (`MergedDecoderLayer`).
  Cross-attention keys are masked by the source padding.
- Dropout on the embedding sums; Pre-LN stacks end with a final norm ("encoder_norm",
  "decoder_norm"), Post-LN stacks end normalised.

Decoding (decode.py) builds the same module with `decode=True`: the decoder layers are then
unrolled (parameters converted with nn/stack.py `unstack_layers` by `decode_params`) and keep
their keys/values (and MAtt's running sum) in the "cache" collection.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models.memory import MemoryTokens, memory_mask, memory_valid
from deepscale_jax.nn.attention import MaskSpec
from deepscale_jax.nn.block import (
    CrossDecodeLayer,
    CrossDecoderLayer,
    MergedDecodeLayer,
    MergedDecoderLayer,
    layer_class,
)
from deepscale_jax.nn.embed import PositionEmbed, TokenEmbed
from deepscale_jax.nn.initializers import LayerInit
from deepscale_jax.nn.linear import Dense
from deepscale_jax.nn.norms import norm_from_config
from deepscale_jax.nn.stack import LayerStack, unstack_layers
from deepscale_jax.schemes.base import Scheme


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
    """The seq2seq model's own options (`config.seq2seq`)."""

    scale_embeddings: bool = False


def check_encoder_decoder(cfg: ModelConfig) -> None:
    if cfg.architecture != "encoder_decoder":
        raise ValueError(
            "the seq2seq model is encoder-decoder; got "
            f"model.architecture={cfg.architecture!r} (set 'encoder_decoder')"
        )


class Seq2Seq(nn.Module):
    config: ModelConfig
    scheme: Scheme
    seq2seq: Seq2SeqConfig = Seq2SeqConfig()
    decode: bool = False
    deterministic: bool = True

    def setup(self) -> None:
        cfg = self.config
        check_encoder_decoder(cfg)
        dtype = jnp.dtype(cfg.dtype)
        init = LayerInit(self.scheme)
        self.embed = TokenEmbed(
            cfg.vocab_size, cfg.d_model, init.for_role("embed"), dtype, fix_norm=cfg.fix_norm
        )
        self.pos_embed = PositionEmbed(
            cfg.max_len, cfg.position_embedding, init.for_role("pos_embed"), dtype
        )
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.memory_tokens:
            self.memory = MemoryTokens(
                cfg.memory_tokens, init.for_role("embed"), dtype, name="memory"
            )
        self.encoder = LayerStack(
            layer_class(cfg),
            cfg,
            self.scheme.for_stack("encoder"),
            cfg.stack_depth("encoder"),
            cfg.scan_layers,
            cfg.remat_policy,
            self.deterministic,
        )
        merged = cfg.merged_attention
        if self.decode:
            layer_cls, scan, remat = (
                (MergedDecodeLayer if merged else CrossDecodeLayer),
                False,
                "none",
            )
        else:
            layer_cls = MergedDecoderLayer if merged else CrossDecoderLayer
            scan, remat = cfg.scan_layers, cfg.remat_policy
        self.decoder = LayerStack(
            layer_cls,
            cfg,
            self.scheme.for_stack("decoder"),
            cfg.stack_depth("decoder"),
            scan,
            remat,
            self.deterministic,
        )
        if cfg.norm_placement == "pre":
            self.encoder_norm = norm_from_config(cfg, None)
            self.decoder_norm = norm_from_config(cfg, None)
        if not cfg.tie_embeddings:
            self.head = Dense(
                (cfg.vocab_size,),
                init.for_role("head"),
                ("embed", "vocab"),
                use_bias=False,
                dtype=dtype,
            )

    def _embed(self, tokens: jax.Array, start: jax.Array | int = 0) -> jax.Array:
        """Dropout(E[tokens] (* sqrt(d)) + P[start + positions]); with fix_norm the embedding
        is sqrt(d) w_hat[tokens] already, and scale_embeddings adds nothing."""
        cfg = self.config
        x = self.embed(tokens)
        if self.seq2seq.scale_embeddings and not cfg.fix_norm:
            x = x * math.sqrt(cfg.d_model)
        if isinstance(start, int) and start == 0:
            x = self.pos_embed(x)
        else:  # decoding: the position row `start` of the whole table
            table = self.pos_embed(jnp.zeros((1, cfg.max_len, cfg.d_model), x.dtype))
            x = x + jax.lax.dynamic_slice_in_dim(table, start, tokens.shape[1], axis=1)
        return self.dropout(x, deterministic=self.deterministic)

    def encode(self, inputs: jax.Array, inputs_valid: jax.Array) -> jax.Array:
        """(B, S, d) encoder output for source tokens (B, S) with validity (B, S); with memory
        tokens (B, m + S, d), [memory ; source] (models/memory.py)."""
        x = self._embed(inputs)
        valid = inputs_valid.astype(bool)
        if self.config.memory_tokens:
            mask = memory_mask(valid, *inputs.shape, self.config, causal=False)
            x = self.memory(x)
        else:
            mask = MaskSpec(kv_valid=valid)
        x = self.encoder(x, mask)
        if self.config.norm_placement == "pre":
            x = self.encoder_norm(x)
        return x

    def decode_logits(
        self,
        decoder_inputs: jax.Array,
        encoded: jax.Array,
        inputs_valid: jax.Array,
        targets_valid: jax.Array | None = None,
        step: jax.Array | int = 0,
        from_cache: bool = False,
    ) -> jax.Array:
        """(B, T, vocab) float32 logits of the next tokens. In training (and the call of a
        `decode=True` model that creates the cache), T target positions under the causal mask;
        with `from_cache`, T = 1 token at position `step`, attending to the cache.
        Targets are right-padded, so the causal mask alone keeps pads out of every valid
        position; `targets_valid` only enters MAtt's average (variants.md sec. 1.4)."""
        cfg = self.config
        x = self._embed(decoder_inputs, step)
        if from_cache and not self.decode:
            raise ValueError("from_cache needs the decode=True model (decode.py)")
        cached = from_cache
        self_mask = None if cached else MaskSpec(causal=True)
        context_valid = inputs_valid.astype(bool)
        if cfg.memory_tokens:  # the decoder reads [memory ; source]
            context_valid = memory_valid(context_valid, *inputs_valid.shape, cfg.memory_tokens)
        context_mask = MaskSpec(kv_valid=context_valid)
        query_valid = None if targets_valid is None or cached else targets_valid.astype(bool)
        x = self.decoder(x, self_mask, encoded, context_mask, query_valid)
        if cfg.norm_placement == "pre":
            x = self.decoder_norm(x)
        logits = self.embed.attend(x) if cfg.tie_embeddings else self.head(x)
        logits = logits.astype(jnp.float32)
        scale = self.scheme.logit_scale()
        return logits if scale == 1.0 else logits * scale

    def __call__(
        self,
        inputs: jax.Array,
        inputs_valid: jax.Array,
        decoder_inputs: jax.Array,
        targets_valid: jax.Array | None = None,
    ) -> jax.Array:
        """Teacher-forced logits (B, T, vocab) for source (B, S) and shifted targets (B, T)."""
        encoded = self.encode(inputs, inputs_valid)
        return self.decode_logits(decoder_inputs, encoded, inputs_valid, targets_valid)


def decode_params(params: dict, cfg: ModelConfig) -> dict:
    """Training params -> the layout of the `decode=True` model (decoder layers unrolled)."""
    decoder = params["decoder"]
    if "layers" not in decoder:
        return params
    return {**params, "decoder": unstack_layers(decoder, cfg.stack_depth("decoder"))}
