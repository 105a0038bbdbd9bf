"""The scheme interface: where a weight sits decides its init; a layer decides its residual.

A scheme is an immutable, hashable value built from the model's shape (`ModelConfig`) and its own
options. It answers two questions, both pure functions of position in the network:
- `init(role, layer)` -> a jax initializer for the weight with that role in that layer;
- `residual(layer)` -> (lambda, beta) in x <- lambda x + beta f(x).
`layer` is the 0-based layer index, an int or a traced int32 under `nn.scan` (so layer-dependent
rules must be jnp math), or None for weights outside the layer stack (embeddings, output head).
Subclasses define `std(role, layer)`; schemes whose inits are not normal override `init`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn.initializers import Initializer, Std, normal

# Weight roles of the decoder LM. Later architectures add theirs (cross_q, ..., patch_embed).
ROLES: tuple[str, ...] = (
    "embed",
    "pos_embed",
    "q",
    "k",
    "v",
    "attn_out",
    "ffn_in",
    "ffn_out",
    "head",
)
LAYER_ROLES = frozenset({"q", "k", "v", "attn_out", "ffn_in", "ffn_out"})


@dataclasses.dataclass(frozen=True)
class Scheme:
    model: ModelConfig
    name: ClassVar[str] = ""

    def init(self, role: str, layer: jax.Array | int | None) -> Initializer:
        return normal(self.std(role, layer))

    def std(self, role: str, layer: jax.Array | int | None) -> Std:
        raise NotImplementedError(f"scheme {self.name!r} defines no std rule")

    def residual(self, layer: jax.Array | int) -> tuple[Std, Std]:
        """(lambda, beta) of the residual merge; the plain residual by default."""
        del layer
        return 1.0, 1.0

    def check_role(self, role: str) -> None:
        if role not in ROLES:
            raise ValueError(
                f"scheme {self.name!r} has no init for role {role!r}; "
                f"known roles: {', '.join(ROLES)}"
            )
