"""The scheme interface: where a weight sits decides its init; a layer decides its residual.

A scheme is an immutable, hashable value built from the model's shape (`ModelConfig`), its own
options, and the stack it serves. It answers, as pure functions of position in the network:
- `init(role, layer)` -> a jax initializer for the weight with that role in that layer
  (normal or uniform with std `std(role, layer)`, see `distribution`; `patch_embed`, whose
  fan-in only the kernel shape knows, uses `patch_std(fan_in)`);
- `residual(layer)` -> (lambda, beta) in x <- lambda x + beta f(x), used by every sublayer of
  the layer;
- `norm_scale(layer)` -> a fixed multiplier on the output of every norm inside the layer
  (1 by default; LayerNorm Scaling's 1/sqrt(l));
- `learned_residual` (class flag) -> the layer creates one zero-initialised scalar parameter
  "resweight", shared by its sublayers, that multiplies beta (ReZero);
- `logit_scale()` -> a fixed multiplier on the output logits (1 by default; DeepScaleLM with
  tied embeddings);
- `with_token_sample(tokens)` -> the scheme completed with statistics of the training data
  (itself by default; DeepScaleLM with `r0_from_data`).
Compatibility with the model is checked once, at construction (`validate`): a scheme lists the
norms (`norms`) and norm placements (`placements`) it is defined for, and a mismatch is a
ValueError naming the field, the value and the accepted ones (no silent override).

`layer` is the 0-based layer index within the scheme's stack, an int or a traced int32 under
`nn.scan` (so layer-dependent rules are jnp math, or a numpy table indexed with jnp), or None
for weights outside the layer stacks (embeddings, output head).

Architectures and stacks (the choice made here): `ModelConfig.architecture` names the stacks of
the model ("decoder_only": decoder; "encoder_only": encoder; "encoder_decoder": both) and
`ModelConfig.stack_depth(stack)` their depths. A scheme is built for one stack, the field
`stack` ("" = the architecture's last stack: the decoder, or the encoder of an encoder-only
model); a model with two stacks builds the second one's layers with `scheme.for_stack(...)`.
So `init(role, layer)` keeps its signature, layer indices count within their own stack (as
DS-Init needs), and stack-dependent constants (DeepNorm, T-Fixup) read `self.stack` and
`self.model.architecture`. Roles are the same in every stack; cross-attention has its own.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn.initializers import Initializer, Std, normal

ROLES: tuple[str, ...] = (
    "embed",
    "pos_embed",
    "patch_embed",
    "q",
    "k",
    "v",
    "attn_out",
    "cross_q",
    "cross_k",
    "cross_v",
    "cross_out",
    "ffn_in",
    "ffn_out",
    "head",
)
ATTENTION_ROLES = frozenset(
    {"q", "k", "v", "attn_out", "cross_q", "cross_k", "cross_v", "cross_out"}
)
LAYER_ROLES = ATTENTION_ROLES | {"ffn_in", "ffn_out"}
# The projections that write into the residual stream or carry its values (the ones depth-scaled
# schemes shrink); q and k only shape the attention pattern.
VALUE_ROLES = frozenset({"v", "attn_out", "cross_v", "cross_out", "ffn_in", "ffn_out"})
# Fields of a scheme that are not user options (build_scheme rejects them as options).
NON_OPTIONS = frozenset({"model", "stack"})
DISTRIBUTIONS = ("normal", "uniform")


def uniform(std: Std) -> Initializer:
    """U(-sqrt(3) std, sqrt(3) std), which has standard deviation `std` (may be traced)."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        u = jax.random.uniform(key, shape, jnp.float32, minval=-1.0, maxval=1.0)
        return (u * (math.sqrt(3.0) * std)).astype(dtype)

    return init


def role_fans(model: ModelConfig, role: str) -> tuple[int, int]:
    """(fan_in, fan_out) of the 2-D matrix a role's weight flattens to, as Flax's DenseGeneral
    and TF's variance scaling count them (variants.md, "JAX/Flax facts"): a (d, heads, d_head)
    projection is d x d. Embedding tables are (rows, d); `patch_embed` depends on the patch shape
    and is handled by `Scheme.patch_std`."""
    d, d_ff, vocab = model.d_model, model.d_ff, model.vocab_size
    fans = {
        "embed": (vocab, d),
        "pos_embed": (model.max_len, d),
        "ffn_in": (d, d_ff),
        "ffn_out": (d_ff, d),
        "head": (d, vocab),
    }
    if role in ATTENTION_ROLES:
        return d, d
    if role not in fans:
        raise ValueError(f"role {role!r} has no fans from the model shape")
    return fans[role]


def glorot_std(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    """Xavier/Glorot std gain * sqrt(2 / (fan_in + fan_out)) (Glorot & Bengio 2010, eq. 16 for
    the uniform form, whose bound is sqrt(3) times this)."""
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def layer_table(table: np.ndarray, layer: jax.Array | int) -> Std:
    """`table[layer]`: a python float for an int layer, a float32 jnp scalar for a traced one
    (both round to the same float32, so scanned and unrolled weights agree bit for bit)."""
    if isinstance(layer, int | np.integer):
        return float(np.float32(table[int(layer)]))
    return jnp.asarray(table, jnp.float32)[layer]


@dataclasses.dataclass(frozen=True)
class Scheme:
    model: ModelConfig
    stack: str = ""
    name: ClassVar[str] = ""
    norms: ClassVar[tuple[str, ...] | None] = None  # model.norm values allowed (None: any)
    placements: ClassVar[tuple[str, ...]] = ("pre", "post")
    learned_residual: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not self.stack:
            object.__setattr__(self, "stack", self.model.stacks[-1])
        self.validate()

    # ------------------------------------------------------------------- validation, stacks

    def validate(self) -> None:
        """Raises ValueError if the scheme is not defined for this model; subclasses extend."""
        self.model._check_stack(self.stack)
        if self.norms is not None and self.model.norm not in self.norms:
            raise ValueError(
                f"scheme {self.name!r} needs model.norm in ({', '.join(self.norms)}); "
                f"got model.norm={self.model.norm!r}"
            )
        if self.model.norm_placement not in self.placements:
            raise ValueError(
                f"scheme {self.name!r} is defined for model.norm_placement in "
                f"({', '.join(self.placements)}); got "
                f"model.norm_placement={self.model.norm_placement!r}"
            )

    def for_stack(self, stack: str) -> Scheme:
        """The same scheme serving the layers of `stack` ("encoder" or "decoder")."""
        return dataclasses.replace(self, stack=stack)

    @property
    def depth(self) -> int:
        """Number of layers in this scheme's stack."""
        return self.model.stack_depth(self.stack)

    def check_role(self, role: str) -> None:
        if role not in ROLES:
            raise ValueError(
                f"scheme {self.name!r} has no init for role {role!r}; "
                f"known roles: {', '.join(ROLES)}"
            )

    # -------------------------------------------------------------------------------- init

    def init(self, role: str, layer: jax.Array | int | None) -> Initializer:
        self.check_role(role)
        draw = uniform if self.distribution(role) == "uniform" else normal
        if role == "patch_embed":
            return _patch_init(self.patch_std, draw)
        return draw(self.std(role, layer))

    def std(self, role: str, layer: jax.Array | int | None) -> Std:
        raise NotImplementedError(f"scheme {self.name!r} defines no std rule")

    def patch_std(self, fan_in: int) -> float:
        """Std of a patch-embedding kernel (fan_in -> d_model); Xavier by default."""
        return glorot_std(fan_in, self.model.d_model)

    def distribution(self, role: str) -> str:
        """ "normal" or "uniform" (both with std `std(role, layer)`)."""
        del role
        return "normal"

    # ------------------------------------------------------------------- forward-pass hooks

    def residual(self, layer: jax.Array | int) -> tuple[Std, Std]:
        """(lambda, beta) of the residual merge; the plain residual by default."""
        del layer
        return 1.0, 1.0

    def norm_scale(self, layer: jax.Array | int) -> Std:
        """Fixed multiplier on every norm output inside the layer; 1 by default."""
        del layer
        return 1.0

    def logit_scale(self) -> float:
        """Fixed multiplier on the output logits; 1 by default."""
        return 1.0

    @property
    def needs_token_sample(self) -> bool:
        """Whether `with_token_sample` must be called before the scheme can initialise."""
        return False

    def with_token_sample(self, tokens: np.ndarray) -> Scheme:
        """The scheme completed with training-data statistics; most schemes need none."""
        del tokens
        return self


def _patch_init(patch_std, draw) -> Initializer:
    """An initializer whose std is `patch_std(fan_in)`, fan_in = prod(kernel shape[:-1])."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return draw(patch_std(math.prod(shape[:-1])))(key, shape, dtype)

    return init
