"""Position-resolved forward moments: the (L, L) token covariance of the residual stream.

The mean-field maps (components.py, attention.py) track one inter-token correlation r. In a
causal stack the tokens are not exchangeable: token i's attention output averages the values of
tokens 0..i, so late tokens converge on a shared prefix average while the first ones keep their
own value (token 0's output is v_0). Their correlation with the rest stays low (measured on the
48-layer xavier Pre-LN LM, layer 10: LayerNorm output of token 0 has correlation ~0.55 with the
late-token average, tokens >= 64 ~0.97), which gives their keys more logit variance and hence
more attention and more gradient (attention_positions.key_tilts). This module propagates the (L, L)
covariance C (per feature) through the sublayers, each map acting on it as on the mean-field
moments:
- a norm divides token i by its own std, so its output correlation is C_ij / sqrt(C_ii C_jj)
  (the per-token norm's O(1/d) correlation change is left out);
- a token-wise branch f (FFN) maps each pair of tokens as its mean-field map maps a pair of
  correlation C_ij: Cov(f_i, f_j) = f(Signal(mu, s^2, C_ij)).cov, read off on a grid of C_ij;
- attention mixes tokens through its tilted mean attention
  (attention_positions.mha_forward_covariance);
- dropout divides the diagonal by 1 - p; the residual adds lambda^2 C + beta^2 C_branch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from deepscale_jax.theory.measure import Signal

_GRID = np.linspace(-1.0, 1.0, 81)


def correlation(cov: np.ndarray) -> np.ndarray:
    """The correlation matrix of a covariance matrix."""
    std = np.sqrt(np.maximum(np.diag(cov), 1e-300))
    return np.clip(cov / np.outer(std, std), -1.0, 1.0)


def off_diagonal_mean(cov: np.ndarray) -> float:
    """Mean of the off-diagonal entries of an (L, L) matrix."""
    length = cov.shape[0]
    return (float(np.sum(cov)) - float(np.trace(cov))) / (length * (length - 1))


def mean_moments(cov: np.ndarray) -> tuple[float, float]:
    """(mean variance, mean off-diagonal covariance / mean variance) of an (L, L) token
    covariance: what `measure.estimate` reports for a stream of that covariance, so a
    position-resolved prediction is compared with the measurement in its own metric. Tokens of
    unequal variance (a causal stack's first tokens) make this lower than the mean-field
    correlation even where every pair is highly correlated."""
    var = float(np.trace(cov)) / cov.shape[0]
    return var, off_diagonal_mean(cov) / var if var > 0 else 0.0


def entrywise(fn: Callable[[float], float], corr: np.ndarray) -> np.ndarray:
    """A smooth function of the correlation `fn` on every entry of a correlation matrix, read
    off a grid of correlations."""
    values = [fn(float(c)) for c in _GRID]
    return np.interp(np.clip(corr, -1.0, 1.0), _GRID, values)


def tokenwise_forward_covariance(
    branch_forward: Any, x: Signal, corr: np.ndarray, diagonal: bool = True
) -> np.ndarray:
    """(L, L) output covariance of a token-wise map on tokens of moments x and correlations
    `corr`: each entry is the mean-field map's covariance at that correlation. `diagonal`: the
    diagonal is each token's own variance (tokens of one sequence); without it, every entry
    pairs two different samples (tokens of two sequences: the same position too)."""
    out = entrywise(lambda c: branch_forward(Signal(x.mean, x.var, c)).cov, corr)
    if diagonal:
        np.fill_diagonal(out, branch_forward(x).var)
    return out


def pairwise_covariance(fn: Any, x: Signal, cross: np.ndarray, var: np.ndarray) -> np.ndarray:
    """A token-wise map `fn` (moments x) on the (L, L) covariance `cross` between the tokens of
    two different sequences, whose per-token variances are `var`."""
    corr = np.asarray(cross) / np.sqrt(np.outer(var, var))
    return tokenwise_forward_covariance(fn, x, corr, diagonal=False)


def forward_covariance(
    sublayer: Any, cache: tuple, cov: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token covariance after the sublayer, token correlation at its branch input, per-token
    variance at its norm's input) from the token covariance `cov` before it (`sublayer.Sublayer`,
    its forward cache). The norm divides each token's gradient by that token's own input std:
    the stream's before a Pre-LN sublayer, the merge's in Post-LN."""
    x, h_or_merged, _ = cache
    branch_input = h_or_merged if sublayer.placement == "pre" else x
    corr = correlation(cov)
    if sublayer.branch_forward_covariance is not None:
        branch = sublayer.branch_forward_covariance(branch_input, corr)
    else:
        branch = tokenwise_forward_covariance(sublayer.branch_forward, branch_input, corr)
    branch = branch + np.diag(np.diag(branch)) * sublayer.p / (1.0 - sublayer.p)
    merged = sublayer.lam**2 * cov + sublayer.beta**2 * branch
    if sublayer.placement == "pre":
        return merged, corr, np.diag(cov).copy()
    if not sublayer.normalizes:
        return merged, corr, np.diag(merged).copy()
    out_var = sublayer.norm_forward(Signal(0.0, 1.0, 0.0)).var  # per-token norm: unit at any input
    return out_var * correlation(merged), corr, np.diag(merged).copy()
