"""Position-resolved forward moments: the (L, L) token covariance of the residual stream.

The mean-field maps (components.py, attention.py) track one inter-token correlation r. In a
causal stack the tokens are not exchangeable: token i's attention output averages the values of
tokens 0..i, so late tokens converge on a shared prefix average while the first ones keep their
own value (token 0's output is v_0). Their correlation with the rest stays low (measured on the
48-layer xavier Pre-LN LM, layer 10: LayerNorm output of token 0 has correlation ~0.55 with the
late-token average, tokens >= 64 ~0.97), which gives their keys more logit variance and hence
more attention and more gradient (attention.key_tilts). This module propagates the (L, L)
covariance C (per feature) through the sublayers, each map acting on it as on the mean-field
moments:
- a norm divides token i by its own std, so its output correlation is C_ij / sqrt(C_ii C_jj)
  (the per-token norm's O(1/d) correlation change is left out);
- a token-wise branch f (FFN) maps each pair of tokens as its mean-field map maps a pair of
  correlation C_ij: Cov(f_i, f_j) = f(Signal(mu, s^2, C_ij)).cov, read off on a grid of C_ij;
- attention mixes tokens through its tilted mean attention (attention.mha_forward_covariance);
- dropout divides the diagonal by 1 - p; the residual adds lambda^2 C + beta^2 C_branch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deepscale_jax.theory.measure import Signal

_GRID = np.linspace(-1.0, 1.0, 81)


def correlation(cov: np.ndarray) -> np.ndarray:
    """The correlation matrix of a covariance matrix."""
    std = np.sqrt(np.maximum(np.diag(cov), 1e-300))
    return np.clip(cov / np.outer(std, std), -1.0, 1.0)


def tokenwise_forward_covariance(branch_forward: Any, x: Signal, corr: np.ndarray) -> np.ndarray:
    """(L, L) output covariance of a token-wise map on tokens of moments x and correlations
    `corr`: each entry is the mean-field map's covariance at that correlation."""
    values = [branch_forward(Signal(x.mean, x.var, float(c))).cov for c in _GRID]
    out = np.interp(corr, _GRID, values)
    np.fill_diagonal(out, branch_forward(x).var)
    return out


def forward_covariance(
    sublayer: Any, cache: tuple, cov: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(token covariance after the sublayer, token correlation at its branch input) from the
    token covariance `cov` before it (`model.Sublayer`, its forward cache)."""
    x, h_or_merged, _ = cache
    branch_input = h_or_merged if sublayer.placement == "pre" else x
    corr = correlation(cov)
    if sublayer.branch_forward_covariance is not None:
        branch = sublayer.branch_forward_covariance(branch_input, corr)
    else:
        branch = tokenwise_forward_covariance(sublayer.branch_forward, branch_input, corr)
    branch = branch + np.diag(np.diag(branch)) * sublayer.p / (1.0 - sublayer.p)
    merged = sublayer.lam**2 * cov + sublayer.beta**2 * branch
    if sublayer.placement == "pre" or not sublayer.normalizes:
        return merged, corr
    out_var = sublayer.norm_forward(Signal(0.0, 1.0, 0.0)).var
    return out_var * correlation(merged), corr
