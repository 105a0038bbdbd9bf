"""One residual sublayer, and the decoder layer built from two of them.

A sublayer is norm placement x residual coefficients x branch f:
- Pre-LN  (Xiong et al. 2020; Kedia et al. 2024 sec. 2.4): x <- lambda x + beta Dropout(f(Norm(x)))
- Post-LN (Vaswani et al. 2017):                          x <- Norm(lambda x + beta Dropout(f(x)))
Everything layer-dependent comes from the scheme through its general hooks (schemes/base.py),
never from its name:
- (lambda, beta) = `scheme.residual(layer)`: lambda = beta = 1 is the plain residual,
  DeepScaleLM uses lambda^2 + beta^2 = 1, DeepNorm lambda = alpha;
- `scheme.learned_residual`: the layer owns one scalar parameter "resweight", initialised to 0
  and shared by its sublayers, which multiplies beta (ReZero: x <- x + alpha_l f(x));
- `scheme.norm_scale(layer)`: a fixed multiplier on the output of each norm in the layer
  (LayerNorm Scaling's 1/sqrt(l); the scheme allows it with Pre-LN only).
Post-LN here is the Vaswani form (the norm closes each sublayer), so a Post-LN stack needs no
final norm.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn.attention import MultiHeadAttention
from deepscale_jax.nn.initializers import LayerInit, zeros
from deepscale_jax.nn.mlp import MLP
from deepscale_jax.nn.norms import make_norm


def scaled(norm: Callable[[jax.Array], jax.Array], scale) -> Callable[[jax.Array], jax.Array]:
    """`norm` followed by the fixed multiplier `scale` (skipped when it is the python 1.0)."""
    if isinstance(scale, float) and scale == 1.0:
        return norm

    def scaled_norm(x: jax.Array) -> jax.Array:
        y = norm(x)
        return (y * scale).astype(y.dtype)

    return scaled_norm


def residual_sublayer(
    x: jax.Array,
    branch: Callable[[jax.Array], jax.Array],
    norm: Callable[[jax.Array], jax.Array],
    dropout: Callable[[jax.Array], jax.Array],
    coefficients: tuple[jax.Array | float, jax.Array | float],
    placement: str,
) -> jax.Array:
    """x <- lambda x + beta Dropout(branch(.)) with the norm before the branch or after the sum."""
    lam, beta = coefficients
    if placement == "pre":
        return lam * x + beta * dropout(branch(norm(x)))
    if placement == "post":
        return norm(lam * x + beta * dropout(branch(x)))
    raise ValueError(f"unknown model.norm_placement={placement!r}; accepted: pre, post")


class DecoderLayer(nn.Module):
    """Self-attention sublayer then FFN sublayer. Signature fits `nn.scan`: (x, ...) -> (x, None).

    `index` is the 0-based layer index (a traced scalar under scan), `key` the layer's init key
    (see nn/initializers.py), `mask` the (B, 1, T, T) attention mask.
    """

    config: ModelConfig
    scheme: object
    deterministic: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, index: jax.Array, key: jax.Array, mask: jax.Array | None
    ) -> tuple[jax.Array, None]:
        cfg = self.config
        dtype = jnp.dtype(cfg.dtype)
        init = LayerInit(self.scheme, index, key)
        lam, beta = self.scheme.residual(index)
        if self.scheme.learned_residual:
            gate = self.param("resweight", nn.with_logical_partitioning(zeros, ()), ())
            beta = beta * gate.astype(dtype)
        coefficients = (lam, beta)
        norm_scale = self.scheme.norm_scale(index)
        dropout = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)

        attention = MultiHeadAttention(
            cfg.num_heads, cfg.attn_dropout, cfg.attention_impl, cfg.use_bias, dtype, name="attn"
        )
        x = residual_sublayer(
            x,
            lambda h: checkpoint_name(attention(h, mask, init, self.deterministic), "attn_out"),
            scaled(make_norm(cfg.norm, cfg.norm_eps, dtype, "attn_norm"), norm_scale),
            dropout,
            coefficients,
            cfg.norm_placement,
        )
        mlp = MLP(cfg.d_ff, cfg.activation, cfg.use_bias, dtype, name="ffn")
        x = residual_sublayer(
            x,
            lambda h: checkpoint_name(mlp(h, init), "ffn_out"),
            scaled(make_norm(cfg.norm, cfg.norm_eps, dtype, "ffn_norm"), norm_scale),
            dropout,
            coefficients,
            cfg.norm_placement,
        )
        x = self.perturb("residual", x)
        self.sow("intermediates", "residual", x)
        return x, None
