"""T-Fixup (Huang, Perez, Ba & Volkovs, "Improving Transformer Optimization Through Better
Initialization", ICML 2020; variants.md 7.3; reference layer6ai-labs/T-Fixup).

No LayerNorm (model.norm must be "none") and no warmup. Projections are Xavier-uniform (fans of
the flattened 2-D matrix), input embeddings N(0, d^-1/2) (std d^-1/2); then
- decoder (of an encoder-decoder or decoder-only model, M layers): v and output projections of
  self- and cross-attention, both FFN matrices, and the input embeddings times (9M)^(-1/4);
- encoder (N layers): v, output projection and both FFN matrices times 0.67 N^(-1/4) (the input
  embeddings of an encoder-only model too: our choice, the paper scales them by the decoder's
  factor, which an encoder-only model lacks);
- q and k unscaled. The reference's extra sqrt(2) on v_proj undoes fairseq's gain 1/sqrt(2) and
  is left out (plain Xavier here). Untied head: N(0, 1/d) (fairseq's output projection).
Residual plain (lambda = beta = 1).
"""

from __future__ import annotations

import dataclasses
import math

import jax

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn.initializers import Std
from deepscale_jax.schemes.base import VALUE_ROLES, Scheme, glorot_std, role_fans


def t_fixup_factor(model: ModelConfig, stack: str) -> float:
    """(9M)^(-1/4) for a decoder of M layers, 0.67 N^(-1/4) for an encoder of N layers."""
    depth = model.stack_depth(stack)
    return (9.0 * depth) ** -0.25 if stack == "decoder" else 0.67 * depth**-0.25


@dataclasses.dataclass(frozen=True)
class TFixupScheme(Scheme):
    name = "t_fixup"
    norms = ("none",)

    @property
    def embed_factor(self) -> float:
        """The input embeddings' factor: the decoder's if there is one (both tables are scaled
        by it in the paper), else the encoder's."""
        stack = "decoder" if "decoder" in self.model.stacks else "encoder"
        return t_fixup_factor(self.model, stack)

    def std(self, role: str, layer: jax.Array | int | None) -> Std:
        self.check_role(role)
        d = self.model.d_model
        if role in ("embed", "pos_embed"):
            return d**-0.5 * self.embed_factor
        if role == "head":
            return math.sqrt(1.0 / d)
        base = glorot_std(*role_fans(self.model, role))
        return base * t_fixup_factor(self.model, self.stack) if role in VALUE_ROLES else base

    def patch_std(self, fan_in: int) -> float:
        return glorot_std(fan_in, self.model.d_model) * self.embed_factor

    def distribution(self, role: str) -> str:
        return "normal" if role in ("embed", "pos_embed", "head") else "uniform"
