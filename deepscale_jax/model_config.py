"""The model section of a config as a typed, frozen, hashable value.

`configs/*.py` write `config.model` as an `ml_collections.ConfigDict`; models and schemes only
ever see this `ModelConfig` built from it (DESIGN.md: "models receive only config.model and the
built scheme"). The dataclass is the single place where model fields, their defaults and their
validation live; config files take their defaults from `ModelConfig()`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from deepscale_jax.validation import check_bool, check_choice, check_int, check_number

ACTIVATIONS = ("relu", "gelu")
# Which stacks a model has; a scheme is built for one stack (schemes/base.py).
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "decoder_only": ("decoder",),
    "encoder_only": ("encoder",),
    "encoder_decoder": ("encoder", "decoder"),
}
NORM_PLACEMENTS = ("pre", "post")
POSITION_EMBEDDINGS = ("learned", "sinusoidal", "none")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash", "pallas_gpu")
MEMORY_MODES = ("prepend", "bottleneck")
DTYPES = ("float32", "bfloat16")
_BOOL_FIELDS = (
    "tie_embeddings",
    "use_bias",
    "scan_layers",
    "merged_attention",
    "fix_norm",
    "use_ffn",
    "fused_qkv",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a transformer; every field is named as in `config.model`.

    `architecture` names the stacks (`ARCHITECTURES`): the LM is "decoder_only"; `num_layers` is
    the depth of the single stack, or of the decoder of an "encoder_decoder" model, whose encoder
    has `encoder_layers` (0 = `num_layers`). Schemes read depths through `stack_depth(stack)`.
    `merged_attention` gives that decoder MAtt layers (Zhang et al. 2019; variants.md sec. 1.4).

    Variants (variants.md): `norm_partial_fraction` is pRMSNorm's p (norm "prms_norm", Zhang &
    Sennrich 2019); `fix_norm` makes the tied embedding rows unit-norm times sqrt(d) (Nguyen &
    Salazar 2019); `persistent_memory` = N learned key/value vectors per head joined to every
    attention's context (Sukhbaatar et al. 2019), and `use_ffn=False` drops the FFN sublayer
    (their all-attention layer); `memory_tokens` = m learned [mem] tokens, `memory_mode`
    "prepend" (MemTransformer) or "bottleneck" (MemBottleneck; Burtsev et al. 2020).

    Speed: `fused_qkv` computes self-attention's Q, K, V with one stacked kernel whose slices are
    initialised per role (nn/attention.py), the same numbers as separate projections.
    """

    vocab_size: int = 256
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    d_ff: int = 512
    max_len: int = 256
    dropout: float = 0.0
    attn_dropout: float = 0.0
    activation: str = "relu"
    norm: str = "layer_norm"
    norm_eps: float = 1e-5
    norm_placement: str = "pre"
    position_embedding: str = "learned"
    tie_embeddings: bool = True
    use_bias: bool = True
    attention_impl: str = "xla"
    scan_layers: bool = True
    remat_policy: str = "none"
    dtype: str = "float32"
    architecture: str = "decoder_only"
    encoder_layers: int = 0
    merged_attention: bool = False
    norm_partial_fraction: float = 0.0625
    fix_norm: bool = False
    persistent_memory: int = 0
    use_ffn: bool = True
    memory_tokens: int = 0
    memory_mode: str = "prepend"
    fused_qkv: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def stacks(self) -> tuple[str, ...]:
        """The layer stacks of the architecture, input side first."""
        return ARCHITECTURES[self.architecture]

    def stack_depth(self, stack: str) -> int:
        """Layers in `stack`: `num_layers`, except the encoder of an encoder-decoder model, which
        has `encoder_layers` (0 = as many as the decoder)."""
        self._check_stack(stack)
        if self.architecture == "encoder_decoder" and stack == "encoder":
            return self.encoder_layers or self.num_layers
        return self.num_layers

    def sublayers(self, stack: str) -> tuple[str, ...]:
        """The residual sublayers of one layer of `stack`: ("attn", "ffn"); in the decoder of an
        encoder-decoder model ("attn", "cross", "ffn"), or ("merged", "ffn") with MAtt; without
        "ffn" when `use_ffn` is False (the all-attention layer)."""
        self._check_stack(stack)
        if self.architecture == "encoder_decoder" and stack == "decoder":
            kinds = ("merged", "ffn") if self.merged_attention else ("attn", "cross", "ffn")
        else:
            kinds = ("attn", "ffn")
        return kinds if self.use_ffn else tuple(k for k in kinds if k != "ffn")

    def residual_merges(self, stack: str) -> int:
        """Residual merges along `stack`'s stream: sublayers per layer times depth."""
        return len(self.sublayers(stack)) * self.stack_depth(stack)

    def _check_stack(self, stack: str) -> None:
        if stack not in self.stacks:
            raise ValueError(
                f"model.architecture={self.architecture!r} has no stack {stack!r}; "
                f"its stacks: {', '.join(self.stacks)}"
            )

    @classmethod
    def from_mapping(cls, fields: Mapping[str, Any]) -> ModelConfig:
        """Builds and validates a ModelConfig from `config.model` (a ConfigDict or dict)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(
                f"unknown field(s) model.{', model.'.join(unknown)}; "
                f"accepted: {', '.join(sorted(known))}"
            )
        config = cls(**dict(fields))
        config.validate()
        return config

    def validate(self) -> None:
        """Raises ValueError naming the first bad field and what would be accepted."""
        # Imported here: the registries live with the modules they name.
        from deepscale_jax.nn.norms import NORMS
        from deepscale_jax.nn.stack import REMAT_POLICIES

        for name in ("vocab_size", "num_layers", "d_model", "num_heads", "d_ff", "max_len"):
            check_int(getattr(self, name), f"model.{name}")
        for name in ("encoder_layers", "persistent_memory", "memory_tokens"):
            check_int(getattr(self, name), f"model.{name}", minimum=0)
        for name in _BOOL_FIELDS:
            check_bool(getattr(self, name), f"model.{name}")
        for name in ("dropout", "attn_dropout"):
            check_number(getattr(self, name), f"model.{name}", 0, 1, high_open=True)
        check_number(self.norm_eps, "model.norm_eps", 0, low_open=True)
        check_number(self.norm_partial_fraction, "model.norm_partial_fraction", 0, 1, low_open=True)
        choices = {
            "activation": ACTIVATIONS,
            "norm": tuple(NORMS),
            "norm_placement": NORM_PLACEMENTS,
            "position_embedding": POSITION_EMBEDDINGS,
            "attention_impl": ATTENTION_IMPLS,
            "remat_policy": tuple(REMAT_POLICIES),
            "dtype": DTYPES,
            "architecture": tuple(ARCHITECTURES),
            "memory_mode": MEMORY_MODES,
        }
        for name, accepted in choices.items():
            check_choice(getattr(self, name), f"model.{name}", accepted)
        if self.encoder_layers and self.architecture != "encoder_decoder":
            raise ValueError(
                f"model.encoder_layers={self.encoder_layers} is only used by "
                f"model.architecture='encoder_decoder' (got {self.architecture!r}); set it to 0"
            )
        if self.fix_norm and not self.tie_embeddings:
            raise ValueError(
                "model.fix_norm=True reuses the normalised embedding as the output matrix; "
                "set model.tie_embeddings=True"
            )
        if self.memory_mode == "bottleneck" and not self.memory_tokens:
            raise ValueError(
                "model.memory_mode='bottleneck' routes the sequence through memory tokens; set "
                "model.memory_tokens > 0"
            )
        if self.merged_attention and self.architecture != "encoder_decoder":
            raise ValueError(
                "model.merged_attention=True (MAtt) replaces the decoder self-attention of an "
                f"encoder-decoder model; model.architecture={self.architecture!r} has none"
            )
        if self.d_model % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}"
            )
