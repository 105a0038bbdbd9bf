"""The Xavier baseline as used by Kedia et al. 2024 (theory.md sec. 2.6, `--xavier-flag-sigma`).

Normal inits with Glorot's fan-average variance 2 / (fan_in + fan_out) (Glorot & Bengio 2010):
- embeddings and position embeddings: sqrt(1/d);
- q, k, v (d -> d_head per head): sqrt(2 / (d + d_head)); the same for cross-attention;
- attention output projection: sqrt(1/d) (also cross-attention's);
- FFN both matrices: sqrt(2 / (d + d_ff)) (= sqrt(2/(5d)) for d_ff = 4d);
- untied output head: sqrt(1/d);
- patch embedding (fan_in -> d): sqrt(2 / (fan_in + d)).
No residual scaling: lambda = beta = 1.
"""

from __future__ import annotations

import dataclasses
import math

from deepscale_jax.nn.initializers import Std
from deepscale_jax.schemes.base import Scheme


@dataclasses.dataclass(frozen=True)
class XavierScheme(Scheme):
    name = "xavier"

    def std(self, role: str, layer) -> Std:
        self.check_role(role)
        d, d_head, d_ff = self.model.d_model, self.model.head_dim, self.model.d_ff
        if role in ("q", "k", "v", "cross_q", "cross_k", "cross_v"):
            return math.sqrt(2.0 / (d + d_head))
        if role in ("ffn_in", "ffn_out"):
            return math.sqrt(2.0 / (d + d_ff))
        return math.sqrt(1.0 / d)  # embed, pos_embed, attn_out, cross_out, head
