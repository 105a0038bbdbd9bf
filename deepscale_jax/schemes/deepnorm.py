"""DeepNorm (Wang et al., "DeepNet: Scaling Transformers to 1,000 Layers", 2022, arXiv
2203.00555; variants.md 7.1).

Post-LN with an up-weighted residual, x <- LN(alpha x + f(x)) (lambda = alpha, beta = 1), and
Xavier-normal init with gain beta_init for the FFN matrices, v and the attention output
(self and cross), gain 1 for q and k (fans of the flattened 2-D matrix). Constants (paper,
xformers `get_deepnorm_coefficients`), N encoder layers, M decoder layers:
    encoder-only:           alpha = (2N)^(1/4),           beta = (8N)^(-1/4)
    decoder-only:           alpha = (2M)^(1/4),           beta = (8M)^(-1/4)
    encoder-decoder encoder: alpha = 0.81 (N^4 M)^(1/16), beta = 0.87 (N^4 M)^(-1/16)
    encoder-decoder decoder: alpha = (3M)^(1/4),          beta = (12M)^(-1/4)
`variant="torchscale"` uses microsoft/torchscale's encoder beta 1.15 (N^4 M)^(-1/16) (the
paper's 0.87 ~= 1/1.15 looks inverted there). Embeddings and the untied head: N(0, 1/d).
Defined for Post-LN only, with a real norm.
"""

from __future__ import annotations

import dataclasses
import math

import jax

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn.initializers import Std
from deepscale_jax.schemes.base import VALUE_ROLES, Scheme, glorot_std, role_fans

VARIANTS = {"paper": 0.87, "torchscale": 1.15}  # encoder-decoder encoder beta constant


def deepnorm_constants(
    model: ModelConfig, stack: str, variant: str = "paper"
) -> tuple[float, float]:
    """(alpha, beta) of `stack` in `model.architecture` (table in the module docstring)."""
    if model.architecture != "encoder_decoder":
        n = model.stack_depth(stack)
        return (2.0 * n) ** 0.25, (8.0 * n) ** -0.25
    n, m = model.stack_depth("encoder"), model.stack_depth("decoder")
    if stack == "encoder":
        mix = (n**4 * m) ** (1.0 / 16.0)
        return 0.81 * mix, VARIANTS[variant] / mix
    return (3.0 * m) ** 0.25, (12.0 * m) ** -0.25


@dataclasses.dataclass(frozen=True)
class DeepNormScheme(Scheme):
    name = "deepnorm"
    norms = ("layer_norm", "rms_norm", "prms_norm", "scale_norm")
    placements = ("post",)
    variant: str = "paper"

    def validate(self) -> None:
        super().validate()
        if self.variant not in VARIANTS:
            raise ValueError(
                f"unknown scheme.variant={self.variant!r}; accepted: {', '.join(VARIANTS)}"
            )

    @property
    def constants(self) -> tuple[float, float]:
        return deepnorm_constants(self.model, self.stack, self.variant)

    def std(self, role: str, layer: jax.Array | int | None) -> Std:
        self.check_role(role)
        if role in ("embed", "pos_embed", "head"):
            return math.sqrt(1.0 / self.model.d_model)
        gain = self.constants[1] if role in VALUE_ROLES else 1.0
        return glorot_std(*role_fans(self.model, role), gain=gain)

    def residual(self, layer: jax.Array | int) -> tuple[float, float]:
        del layer
        return self.constants[0], 1.0
