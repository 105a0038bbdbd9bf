"""GPT-2 / Megatron-LM default init (Radford et al. 2019; Shoeybi et al. 2019).

Every weight N(0, std^2) with std = 0.02 (configurable as `scheme.std_base`); the projections
that write into the residual stream (attention and cross-attention output, FFN output) are scaled
down by 1/sqrt(2N), N = number of layers (3N merges in an encoder-decoder's decoder), so the
residual stream's variance stays O(1) over its merges.
No residual scaling: lambda = beta = 1.
"""

from __future__ import annotations

import dataclasses
import math

from deepscale_jax.nn.initializers import Std
from deepscale_jax.schemes.base import Scheme


@dataclasses.dataclass(frozen=True)
class DefaultScheme(Scheme):
    name = "default"
    std_base: float = 0.02

    def validate(self) -> None:
        super().validate()
        if not self.std_base > 0:
            raise ValueError(f"scheme.std_base={self.std_base!r} must be positive")

    def std(self, role: str, layer) -> Std:
        self.check_role(role)
        if role in ("attn_out", "cross_out", "ffn_out"):
            return self.std_base / math.sqrt(self.model.residual_merges(self.stack))
        return self.std_base

    def patch_std(self, fan_in: int) -> float:
        return self.std_base
