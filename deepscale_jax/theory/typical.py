r"""One model's typical moments, where the mean-field maps give the mean over weight draws.

A mean-field map is E over the weights of one sublayer's gain. A deep stack's gradient is a
product of ~2N such gains, each a random draw in one model; the typical (geometric-mean)
product is exp(sum E log gain), smaller than prod E gain by the Jensen gaps
E log g - log E g ~ -Var g / (2 (E g)^2). Two sources are modelled, both for the
position-resolved prediction of model.py (the one compared with single models and with
geometric means over init seeds, experiments/README.md):

- `typical_norm_gain`: a Post-LN norm's statistic, a draw common to all tokens once the
  stream has collapsed (the fluctuation that averages over tokens is kept, the common one not).
- `typical_merge_factor`: the realised gain of the random branch matrix at a residual merge,
  acting on a gradient that spans few directions (a collapsed Post-LN stream: token 0's
  gradient spans 2-4 directions over 16 sequences, experiments/README.md).
"""

from __future__ import annotations

import numpy as np

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn.norms import partial_features
from deepscale_jax.theory.measure import Signal


def statistic_relative_variance(cfg: ModelConfig, x: Signal) -> float:
    """Var(q) / E[q]^2 of a norm's statistic q for Gaussian input x (per feature N(mu, s^2)):
    q = |x - mean|^2 / d for LayerNorm (n = d - 1 degrees of freedom, mu removed), |x|^2 / n
    over the n = d features of RMSNorm and ScaleNorm, the first n = k of pRMSNorm:
        Var q / E[q]^2 = (4 mu^2 s^2 + 2 s^4) / (n (mu^2 + s^2)^2)   (2/n at mu = 0)."""
    if cfg.norm == "none":
        return 0.0
    mu2 = 0.0 if cfg.norm == "layer_norm" else x.mean**2
    n = {"layer_norm": cfg.d_model - 1, "prms_norm": None}.get(cfg.norm, cfg.d_model)
    if n is None:
        n = partial_features(cfg.d_model, cfg.norm_partial_fraction)
    return (4 * mu2 * x.var + 2 * x.var**2) / (n * (mu2 + x.var) ** 2)


def typical_norm_gain(cfg: ModelConfig, scale: float, x: Signal, specific: float) -> float:
    """A Post-LN norm's backward gain in one model, on a gradient orthogonal to its output:
        scale^2 / E[q] * (1 + specific * Var q / E[q]^2)     (q: `statistic_relative_variance`).
    No projection loss: each block is homogeneous of degree 1 in its input and the norm is
    scale-invariant, so the gradient reaching a Post-LN norm is already orthogonal to its
    output. The mean-field gain's E[1/q] = (1 + Var q / E[q]^2) / E[q] (delta method; LayerNorm:
    d/(s^2 (d - 3)), components.layernorm_backward) averages over independent draws of q per
    token; in one model the part of q's fluctuation common to all tokens of all sequences is a
    single draw per sublayer, whose typical (geometric-mean) effect on the gradient over many
    sublayers is 1/E[q], and only the token-specific part, the fraction `specific`
    (`Sublayer.specific_fluctuation`), averages over tokens into the mean-field boost."""
    if cfg.norm == "none":
        return scale**2
    second = x.var if cfg.norm == "layer_norm" else x.var + x.mean**2
    eps = 0.0 if cfg.norm == "scale_norm" else cfg.norm_eps
    return scale**2 / (second + eps) * (1 + specific * statistic_relative_variance(cfg, x))


def inverse_participation(cov: np.ndarray, cross: np.ndarray, batch: int) -> float:
    """tr(G^2) / tr(G)^2 for the Gram matrix G of the batch x L gradient vectors of one layer,
    whose per-feature entries are `cov` (L, L) within a sequence and `cross` (L, L) between
    sequences: G = I_B (x) (cov - cross) + J_B (x) cross (J all-ones), so
        tr G = B tr cov,   tr G^2 = B tr A^2 + 2 B tr(A cross) + B^2 tr cross^2,  A = cov - cross.
    1 for a single direction, 1/(B L) for B L orthogonal vectors of equal norm."""
    a = cov - cross
    total = (batch * np.trace(cov)) ** 2
    if total <= 0:
        return 0.0
    within = np.sum(a * a.T) + 2 * np.sum(a * cross.T)  # tr A^2 + 2 tr(A cross)
    square = batch * within + batch**2 * np.sum(cross * cross.T)
    return float(square / total)


def merge_relative_variance(
    c: float, d: int, width: int, inverse_pr: float, shared: float = 0.0
) -> float:
    """Var / E^2 over the branch weights of the gradient energy |lam g + beta M^T g|^2 at a
    residual merge, for a set of gradients g in d features whose feature second-moment matrix
    S = sum g g^T has inverse participation `inverse_pr` = tr S^2 / tr(S)^2 (1: one direction).

    c = beta^2 E|M^T g|^2 / (lam^2 |g|^2) is the branch's share. M is a product of two Gaussian
    matrices through `width` units (attention: sum_h W_v^h W_o^h, width H d_head = d; FFN:
    W_1 D W_2, width the active units; 0: one Gaussian matrix). For one vector the cross term
    2 lam beta g.M^T g has relative variance 4 c/d (in units of (lam^2 |g|^2)^2), and
    |M^T g|^2 = |W_2^T u|^2 with |u|^2 ~ chi^2_width and the second factor ~ chi^2_d, relative
    variance 2/d + 2/width; the two are uncorrelated (odd in M). For a set, both carry
    tr S^2 / tr(S)^2. `shared` is the relative variance of a factor of |M^T g|^2 common to
    every vector (a ReLU FFN on a collapsed input: its active count ~ Binomial(d_ff, 1/2),
    1/d_ff):
        v = [(4 c / d + 2 c^2 (1/d + 1/width)) inverse_pr + c^2 shared] / (1 + c)^2."""
    if c <= 0:
        return 0.0
    through = 1 / width if width > 0 else 0.0
    per_direction = (4 * c / d + 2 * c * c * (1 / d + through)) * inverse_pr
    return (per_direction + c * c * shared) / (1 + c) ** 2


def typical_merge_factor(
    c: float, d: int, width: int, cov: np.ndarray, cross: np.ndarray, batch: int
) -> float:
    """exp(-v/2) (`merge_relative_variance` v): the typical one-model gradient energy after a
    residual merge relative to its mean-field mean, E log(1 + e) ~ -Var e / 2. The gradients'
    inverse participation is that of their Gram matrix (`inverse_participation`) plus 1/d: n
    independent isotropic vectors in d features have E tr S^2 / tr(S)^2 ~ 1/n + 1/d, and the
    covariance model knows the first part only. The FFN's shared mask term (`shared`) is
    left out: at most c^2/(1 + c)^2/d_ff per sublayer, under 0.01 in log over 96 layers at
    d_ff = 512."""
    inverse_pr = inverse_participation(np.asarray(cov), np.asarray(cross), batch) + 1 / d
    return float(np.exp(-merge_relative_variance(c, d, width, inverse_pr) / 2))
