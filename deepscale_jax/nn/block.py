"""One residual sublayer, and the transformer layers built from it.

`DecoderLayer` (the LM's and the encoder's layer) = self-attention + FFN sublayers. Its `kind`
option adds the encoder-decoder decoder layers (Vaswani et al. 2017, sec. 3.1; Zhang et al.
2019 for MAtt), the same sublayers with the same hooks:
- "self":   [self-attention] [FFN]                    (`DecoderLayer`)
- "cross":  [self-attention] [cross-attention] [FFN]  (`CrossDecoderLayer`)
- "merged": [MAtt: averaged self-attention + cross-attention, shared W_v and W_o] [FFN]
            (`MergedDecoderLayer`; variants.md sec. 1.4).
- "read":   [attention from x to `context` only, self-attention roles] [FFN]; the two steps of
            a MemBottleneck layer (`BottleneckLayer`; Burtsev et al. 2020, variants.md sec. 5).
`model.use_ffn=False` drops the FFN sublayer (the all-attention layer of Sukhbaatar et al. 2019,
whose persistent memory, `model.persistent_memory`, lives in nn/attention.py).
Cross-attention and MAtt take their weights from the roles cross_q/cross_k/cross_v/cross_out.
`decode=True` runs them one token at a time against the "cache" collection (nn/attention.py).

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
from deepscale_jax.nn.attention import CROSS_ROLES, SELF_ROLES, MultiHeadAttention
from deepscale_jax.nn.initializers import LayerInit, zeros
from deepscale_jax.nn.mlp import MLP
from deepscale_jax.nn.norms import norm_from_config


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


LAYER_KINDS = ("self", "cross", "merged", "read")


class DecoderLayer(nn.Module):
    """Attention sublayer(s) then FFN sublayer. Signature fits `nn.scan`: (x, ...) -> (x, None).

    `index` is the 0-based layer index (a traced scalar under scan), `key` the layer's init key
    (see nn/initializers.py), `mask` the (B, 1, T, T) self-attention mask (None when decoding
    from the cache). "cross"/"merged" layers also take `context` (B, S, d), the encoder output,
    its `context_mask` (B, 1, 1, S) and, for MAtt's average, `query_valid` (B, T).
    """

    config: ModelConfig
    scheme: object
    deterministic: bool = True
    kind: str = "self"
    decode: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        index: jax.Array,
        key: jax.Array,
        mask: jax.Array | None,
        context: jax.Array | None = None,
        context_mask: jax.Array | None = None,
        query_valid: jax.Array | None = None,
    ) -> tuple[jax.Array, None]:
        cfg = self.config
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; accepted: {LAYER_KINDS}")
        if self.kind != "self" and context is None:
            raise ValueError(f"a {self.kind!r} decoder layer needs the encoder output (context)")
        dtype = jnp.dtype(cfg.dtype)
        init = LayerInit(self.scheme, index, key)
        lam, beta = self.scheme.residual(index)
        if self.scheme.learned_residual:
            gate = self.param("resweight", nn.with_logical_partitioning(zeros, ()), ())
            beta = beta * gate.astype(dtype)
        coefficients = (lam, beta)
        norm_scale = self.scheme.norm_scale(index)
        dropout = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)

        def sublayer(x, branch, norm_name):
            norm = norm_from_config(cfg, norm_name)
            return residual_sublayer(
                x, branch, scaled(norm, norm_scale), dropout, coefficients, cfg.norm_placement
            )

        def attention(roles, merged=False, name="attn"):
            return MultiHeadAttention(
                cfg.num_heads,
                cfg.attn_dropout,
                cfg.attention_impl,
                cfg.use_bias,
                dtype,
                roles=roles,
                merged=merged,
                decode=self.decode,
                persistent_memory=cfg.persistent_memory if roles == SELF_ROLES else 0,
                fused_qkv=cfg.fused_qkv,
                name=name,
            )

        if self.kind == "read":  # keys/values from the context, normalised like a query
            reader = attention(SELF_ROLES)
            norm = scaled(norm_from_config(cfg, "attn_norm"), norm_scale)
            kv = norm(context) if cfg.norm_placement == "pre" else context
            x = residual_sublayer(
                x,
                lambda h: checkpoint_name(
                    reader(h, context_mask, init, self.deterministic, kv), "attn_out"
                ),
                norm,
                dropout,
                coefficients,
                cfg.norm_placement,
            )
        elif self.kind == "merged":
            merged = attention(CROSS_ROLES, merged=True, name="merged_attn")
            x = sublayer(
                x,
                lambda h: checkpoint_name(
                    merged(h, context_mask, init, self.deterministic, context, query_valid),
                    "attn_out",
                ),
                "attn_norm",
            )
        else:
            self_attention = attention(SELF_ROLES)
            x = sublayer(
                x,
                lambda h: checkpoint_name(
                    self_attention(h, mask, init, self.deterministic), "attn_out"
                ),
                "attn_norm",
            )
        if self.kind == "cross":
            cross = attention(CROSS_ROLES, name="cross_attn")
            x = sublayer(
                x,
                lambda h: checkpoint_name(
                    cross(h, context_mask, init, self.deterministic, context), "attn_out"
                ),
                "cross_norm",
            )
        if cfg.use_ffn:
            mlp = MLP(cfg.d_ff, cfg.activation, cfg.use_bias, dtype, name="ffn")
            x = sublayer(x, lambda h: checkpoint_name(mlp(h, init), "ffn_out"), "ffn_norm")
        x = self.perturb("residual", x)
        self.sow("intermediates", "residual", x)
        return x, None


class CrossDecoderLayer(DecoderLayer):
    """The encoder-decoder decoder layer: self-attention, cross-attention, FFN."""

    kind: str = "cross"


class MergedDecoderLayer(DecoderLayer):
    """The MAtt decoder layer: merged attention, FFN (no separate self-attention)."""

    kind: str = "merged"


class CrossDecodeLayer(DecoderLayer):
    """`CrossDecoderLayer` for cached one-token decoding."""

    kind: str = "cross"
    decode: bool = True


class MergedDecodeLayer(DecoderLayer):
    """`MergedDecoderLayer` for cached one-token decoding."""

    kind: str = "merged"
    decode: bool = True


class BottleneckLayer(nn.Module):
    """One MemBottleneck layer on x = [memory ; sequence] (B, m + T, d) (Burtsev et al. 2020;
    variants.md sec. 5):
        H^mem_{l+1} = Layer^mem_l(queries H^mem_l, keys/values [H^mem_l ; H^seq_l]),
        H^seq_{l+1} = Layer_l(queries H^seq_l, keys/values H^mem_{l+1}),
    two "read" layers with their own weights ("memory", "sequence"; init keys folded from the
    layer's key). `mask` is the (B, 1, 1, m + T) key mask of the memory step. Same signature as
    `DecoderLayer`, so `LayerStack` scans it."""

    config: ModelConfig
    scheme: object
    deterministic: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, index: jax.Array, key: jax.Array, mask: jax.Array | None
    ) -> tuple[jax.Array, None]:
        m = self.config.memory_tokens
        read = lambda name: DecoderLayer(
            self.config, self.scheme, self.deterministic, kind="read", name=name
        )
        memory, sequence = x[:, :m], x[:, m:]
        keys = [None if key is None else jax.random.fold_in(key, i) for i in (0, 1)]
        memory, _ = read("memory")(memory, index, keys[0], None, x, mask)
        sequence, _ = read("sequence")(sequence, index, keys[1], None, memory, None)
        return jnp.concatenate([memory, sequence], axis=1), None


def layer_class(cfg: ModelConfig) -> type[nn.Module]:
    """The layer of a single-stream stack (LM, encoder): `BottleneckLayer` for
    `model.memory_mode="bottleneck"` with memory tokens, else `DecoderLayer`."""
    if cfg.memory_tokens and cfg.memory_mode == "bottleneck":
        return BottleneckLayer
    return DecoderLayer
