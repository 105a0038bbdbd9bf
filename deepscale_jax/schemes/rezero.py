"""ReZero (Bachlechner et al., "ReZero is All You Need", 2020, arXiv 2003.04887; variants.md 7.4).

x <- x + alpha_l f(x) with one learned scalar alpha_l per layer ("resweight"), initialised to 0
and shared by the layer's sublayers (reference majumderb/rezero `rztx.py`), no LayerNorm
(model.norm must be "none", so there is no final norm either). The hidden dropout acts on the
branch before the gate. At init every layer is the identity, so the weights' scale only matters
once alpha moves: projections Xavier-normal (fans of the flattened 2-D matrix), embeddings and
the untied head N(0, 1/d).
"""

from __future__ import annotations

import dataclasses
import math

import jax

from deepscale_jax.nn.initializers import Std
from deepscale_jax.schemes.base import Scheme, glorot_std, role_fans


@dataclasses.dataclass(frozen=True)
class ReZeroScheme(Scheme):
    name = "rezero"
    norms = ("none",)
    learned_residual = True

    def std(self, role: str, layer: jax.Array | int | None) -> Std:
        self.check_role(role)
        if role in ("embed", "pos_embed", "head"):
            return math.sqrt(1.0 / self.model.d_model)
        return glorot_std(*role_fans(self.model, role))
