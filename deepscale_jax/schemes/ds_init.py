"""DS-Init: depth-scaled initialisation (Zhang, Titov & Sennrich, EMNLP 2019, arXiv 1908.11365).

Every weight inside layer l (1-based, counted within its own stack: 1..N in the encoder, 1..M
in the decoder) is Xavier-uniform with its bound shrunk by depth (variants.md 1.2-1.3;
gamma = sqrt(6 / (fan_in + fan_out)), fans of the flattened 2-D matrix, a (d, heads, d_head)
projection being d x d):
- mode "paper" (the paper's formula): W ~ U(-gamma alpha/sqrt(l), +gamma alpha/sqrt(l)),
  Var = gamma^2 alpha^2 / (3 l), i.e. variance_scaling(alpha^2 / l, fan_avg, uniform);
- mode "zero_code" (the authors' released code, bzhangGo/zero):
  variance_scaling(gain / sqrt(l), fan_avg, uniform): bound gamma sqrt(gain) l^(-1/4),
  Var = gamma^2 gain / (3 sqrt(l)).
Outside the layers, as in the reference: token and position embeddings N(0, d^-1/2) (std
d^-1/2; the reference also multiplies the lookup by sqrt(d), which this LM does not), the untied
head and a patch embedding Xavier-uniform without depth scaling. Biases 0, norm gains 1.
Our attention has separate q, k, v (the reference encoder fuses them into one d x 3d matrix,
whose fans differ). The residual is plain (lambda = beta = 1); DS-Init targets Post-LN and is
defined for Pre-LN too.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from deepscale_jax.nn.initializers import Std
from deepscale_jax.schemes.base import LAYER_ROLES, Scheme, glorot_std, layer_table, role_fans

MODES = ("paper", "zero_code")


def depth_factors(depth: int, mode: str, alpha: float, gain: float) -> np.ndarray:
    """Std multiplier of each layer l = 1..depth: alpha l^(-1/2) ("paper") or sqrt(gain) l^(-1/4)
    ("zero_code"). A numpy table, indexed with the (possibly traced) layer index, so scanned and
    unrolled stacks compute no in-graph math and agree bit for bit."""
    index = np.arange(1, depth + 1, dtype=np.float64)
    return alpha / np.sqrt(index) if mode == "paper" else np.sqrt(gain) * index**-0.25


@dataclasses.dataclass(frozen=True)
class DSInitScheme(Scheme):
    name = "ds_init"
    mode: str = "paper"
    alpha: float = 1.0
    gain: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.mode not in MODES:
            raise ValueError(f"unknown scheme.mode={self.mode!r}; accepted: {', '.join(MODES)}")
        for option in ("alpha", "gain"):
            if not getattr(self, option) > 0:
                raise ValueError(f"scheme.{option}={getattr(self, option)!r} must be positive")

    def std(self, role: str, layer: jax.Array | int | None) -> Std:
        self.check_role(role)
        if role in ("embed", "pos_embed"):
            return self.model.d_model**-0.5
        base = glorot_std(*role_fans(self.model, role))
        if role in LAYER_ROLES:
            factors = depth_factors(self.depth, self.mode, self.alpha, self.gain)
            return layer_table(base * factors, layer)
        return base  # head

    def distribution(self, role: str) -> str:
        return "normal" if role in ("embed", "pos_embed") else "uniform"
