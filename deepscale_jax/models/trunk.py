"""The parts every model shares, called from inside a model's `@nn.compact` `__call__`.

Every model is embeddings -> one stack of nn/block.py layers -> (final norm) -> head:
- `embed_tokens`: h_0 = E[tokens] + P[positions] (roles "embed", "pos_embed"); with
  `model.fix_norm` (FixNorm, Nguyen & Salazar 2019) E[tokens] is sqrt(d) times the unit-norm row
  and the tied logits use the unit-norm rows (nn/embed.py `TokenEmbed`);
- `stack_input`: Dropout(h_0) with the measurement hooks on it ("embed_out": `perturb` for its
  gradient, `sow` for its value; theory/model_measure.py reads them), no-ops in training;
- `layer_stack`: the N residual layers under the model's mask (causal for the LM, key padding
  for the MLM, none for the ViT), plus the final norm a Pre-LN stack ends with (Xiong et al.
  2020; a Post-LN stack ends normalised already);
- `vocab_logits`: h_N E^T with a tied embedding (Press & Wolf 2017) or h_N W_head, in float32,
  times the scheme's fixed `logit_scale()` (DeepScaleLM's unit-variance logits).
Submodules created here belong to the calling module, under the names given.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn.block import layer_class
from deepscale_jax.nn.embed import PositionEmbed, TokenEmbed
from deepscale_jax.nn.initializers import LayerInit
from deepscale_jax.nn.linear import Dense
from deepscale_jax.nn.norms import norm_from_config
from deepscale_jax.nn.stack import LayerStack
from deepscale_jax.schemes.base import Scheme


def add_positions(x: jax.Array, cfg: ModelConfig, scheme: Scheme) -> jax.Array:
    """x + P[positions] (learned, sinusoidal or none, as `model.position_embedding` says)."""
    return PositionEmbed(
        cfg.max_len,
        cfg.position_embedding,
        LayerInit(scheme).for_role("pos_embed"),
        jnp.dtype(cfg.dtype),
        name="pos_embed",
    )(x)


def embed_tokens(
    tokens: jax.Array, cfg: ModelConfig, scheme: Scheme
) -> tuple[jax.Array, TokenEmbed]:
    """(E[tokens] + P[positions], the token embedding module, for a tied output)."""
    embed = TokenEmbed(
        cfg.vocab_size,
        cfg.d_model,
        LayerInit(scheme).for_role("embed"),
        jnp.dtype(cfg.dtype),
        fix_norm=cfg.fix_norm,
        name="embed",
    )
    return add_positions(embed(tokens), cfg, scheme), embed


def stack_input(
    module: nn.Module, x: jax.Array, cfg: ModelConfig, deterministic: bool
) -> jax.Array:
    """Dropout(x), then the "embed_out" measurement hooks of `module`."""
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = module.perturb("embed_out", x)
    module.sow("intermediates", "embed_out", x)
    return x


def layer_stack(
    x: jax.Array,
    mask: jax.Array | None,
    cfg: ModelConfig,
    scheme: Scheme,
    deterministic: bool,
    name: str,
) -> jax.Array:
    """The model's `num_layers` residual layers (scanned or not, remat as configured), then the
    final norm of a Pre-LN stack."""
    x = LayerStack(
        layer_class(cfg),
        cfg,
        scheme,
        cfg.num_layers,
        cfg.scan_layers,
        cfg.remat_policy,
        deterministic,
        name=name,
    )(x, mask)
    if cfg.norm_placement == "pre":
        x = norm_from_config(cfg, "final_norm")(x)
    return x


def vocab_logits(x: jax.Array, embed: TokenEmbed, cfg: ModelConfig, scheme: Scheme) -> jax.Array:
    """(B, T, vocab) float32 logits: tied (`embed.attend`: h E^T, or h w_hat^T with fix_norm)
    or an untied "head" (role "head")."""
    if cfg.tie_embeddings:
        logits = embed.attend(x)
    else:
        logits = Dense(
            (cfg.vocab_size,),
            LayerInit(scheme).for_role("head"),
            ("embed", "vocab"),
            use_bias=False,
            dtype=jnp.dtype(cfg.dtype),
            name="head",
        )(x)
    logits = logits.astype(jnp.float32)
    scale = scheme.logit_scale()
    return logits if scale == 1.0 else logits * scale
