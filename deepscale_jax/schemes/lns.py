"""LayerNorm Scaling (Sun et al., "The Curse of Depth in Large Language Models", NeurIPS 2025,
arXiv 2502.05795; variants.md 7.5).

Pre-LN with every in-layer norm output multiplied by 1/sqrt(l), l the 1-based layer index:
    h = x + Attn(Norm(x)/sqrt(l));   y = h + FFN(Norm(h)/sqrt(l))
(the final norm is not scaled); no new parameters, plain residual. Init: every weight
N(0, std_base^2) with std_base = 0.02 and no depth-scaled output projections (the authors warn
that depth-scaled init "diminishes the effectiveness"). Defined for Pre-LN with a real norm.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from deepscale_jax.nn.initializers import Std
from deepscale_jax.schemes.base import Scheme, layer_table


def lns_factors(depth: int) -> np.ndarray:
    """1/sqrt(l) for l = 1..depth (a numpy table indexed with the layer index)."""
    return 1.0 / np.sqrt(np.arange(1, depth + 1, dtype=np.float64))


@dataclasses.dataclass(frozen=True)
class LayerNormScalingScheme(Scheme):
    name = "lns"
    norms = ("layer_norm", "rms_norm", "prms_norm", "scale_norm")
    placements = ("pre",)
    std_base: float = 0.02

    def validate(self) -> None:
        super().validate()
        if not self.std_base > 0:
            raise ValueError(f"scheme.std_base={self.std_base!r} must be positive")

    def std(self, role: str, layer: jax.Array | int | None) -> Std:
        self.check_role(role)
        return self.std_base

    def patch_std(self, fan_in: int) -> float:
        return self.std_base

    def norm_scale(self, layer: jax.Array | int) -> Std:
        return layer_table(lns_factors(self.depth), layer)
