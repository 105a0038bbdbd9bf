"""Expected squared norms of weight gradients at initialization, from token covariances.

For a linear map y = x W (W: d_in x d_out) applied to the T tokens of B sequences,
dL/dW = sum_n x_n^T g_n, and with x independent of the upstream gradient g (mean-field),

    E |dL/dW|_F^2 = d_in d_out [B sum_{t, t'} X_tt' G_tt' + B (B - 1) sum_{t, t'} X^x_tt' G^x_tt'],

X_tt' = E[x_t x_t'] the per-feature token second-moment matrix of the input (mean included),
G_tt' = E[g_t g_t'] the per-feature token covariance of the output gradient. The second term is
the pairs of tokens from different sequences: at initialization every sequence is pushed
through the same weights, so the component all tokens share (the direction the stream
collapses onto, and the gradient of the loss on the average prediction) is shared across
sequences too (measured on the real 8-layer Pre-LN LM: cross-sequence gradient covariance
6.58e-12 against 6.60e-12 within sequences). X^x and G^x (L, L) are the cross-sequence
moments, propagated by theory/model.py alongside the within-sequence ones. X^x is not uniform:
tokens at the same position of two sequences share the position embedding (about half the
embedding's variance at init), and the first tokens of a causal stack share less with the
rest. With B = 16 the cross-sequence term dominates once tokens are correlated. This is the
quantity the authors plot per layer (Kedia et al. 2024, sec. 5 figures; theory.md 2.7: sqrt of
the summed squared weight gradients of a layer).

Token covariances are (L, L) matrices: the gradient side comes position-resolved from
theory/model.py (causal stacks treat the first tokens very differently), and so does the input
side across sequences; within a sequence the input side is mean-field (equal variance and
correlation for all tokens, except the attention context, whose variance differs by query
row).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from deepscale_jax.theory import attention, attention_positions, components
from deepscale_jax.theory.measure import Grad, Signal
from deepscale_jax.theory.token_correlation import entrywise


def second_moments(x: Signal, length: int, row_var: np.ndarray | None = None) -> np.ndarray:
    """(L, L) matrix E[x_t x_t'] per feature: second moment on the diagonal (per row with
    `row_var`), covariance plus squared mean off it."""
    diag = x.var + x.mean**2 if row_var is None else np.asarray(row_var) + x.mean**2
    off = x.cov + x.mean**2
    return off * np.ones((length, length)) + np.diag(np.broadcast_to(diag - off, (length,)))


def _gains(backward: Callable[[Grad], Grad]) -> tuple[float, float]:
    """(variance gain, covariance gain) of a token-wise linear backward map, read off the
    mean-field map on a probe gradient of unit variance and correlation 1/2."""
    probe = backward(Grad(1.0, 0.5))
    return probe.var, probe.cov / 0.5


def tokenwise(backward: Callable[[Grad], Grad], cov: np.ndarray) -> np.ndarray:
    """A token-wise linear backward map applied to a token covariance matrix: its variance gain
    on the diagonal, its covariance gain off it (both read off the mean-field map)."""
    var_gain, cov_gain = _gains(backward)
    return cov_gain * cov + (var_gain - cov_gain) * np.diag(np.diag(cov))


def linear_weight_grad_sq(
    d_in: int,
    d_out: int,
    inputs: np.ndarray,
    grads: np.ndarray,
    batch: int,
    inputs_cross: np.ndarray | float = 0.0,
    grads_cross: np.ndarray | float = 0.0,
) -> float:
    """E |dL/dW|_F^2 over `batch` sequences (module docstring): (L, L) within-sequence moments
    `inputs` (X), `grads` (G); cross-sequence second moments `inputs_cross` (X^x, mean
    included; (L, L) or one value for all pairs) and gradient covariance `grads_cross` (G^x)."""
    within = batch * np.sum(inputs * grads)
    across = batch * (batch - 1) * np.sum(inputs_cross * np.asarray(grads_cross))
    return float(d_in * d_out * (within + across))


def cross_tokenwise_gain(backward: Callable[[Signal, Grad], Grad], pair: Signal) -> float:
    """A token-wise backward map's gain on the gradient covariance of two tokens whose inputs
    have the moments `pair` (e.g. of two sequences): its covariance gain, read off the
    mean-field map."""
    return _gains(lambda g: backward(pair, g))[1]


def cross_tokenwise(backward: Callable[[Grad], Grad], cross: np.ndarray) -> np.ndarray:
    """A token-wise linear backward map on a cross-sequence covariance: every entry pairs two
    different tokens, so all get the map's covariance gain."""
    return _gains(backward)[1] * cross


def with_cov(x: Signal, cov: float) -> Signal:
    """x with covariance `cov` between the two tokens considered (e.g. of two sequences); the
    correlation is clipped to [-1, 1]."""
    return Signal(x.mean, x.var, float(np.clip(cov / x.var, -1.0, 1.0)) if x.var > 0 else 0.0)


def attention_weight_grad_sq(
    h: Signal,
    branch_grad: np.ndarray,
    batch: int,
    h_cross: np.ndarray | float,
    branch_grad_cross: np.ndarray,
    *,
    d: int,
    heads: int,
    L: int,
    sigma_q: float,
    sigma_k: float,
    sigma_v: float,
    sigma_o: float,
    p_attn: float,
    causal: bool,
) -> float:
    """Summed E |dL/dW|^2 of W_q, W_k, W_v (input h) and W_o (input: the context) of
    `MultiHeadAttention`, from the token covariance of the gradient at its output (within and
    across sequences; `h_cross` is the (L, L) cross-sequence covariance of h). dQ and dK are
    taken as uncorrelated across tokens (attention.py, step 4)."""
    head = attention.mha_head(h, d, heads, L, sigma_q, sigma_k, sigma_v, p_attn, causal)
    context_var, context_cov = head.forward()
    context = Signal(0.0, context_var, context_cov / context_var if context_var > 0 else 0.0)
    context_grad = d * sigma_o**2 * branch_grad
    grads = attention_positions.projection_gradients(head, context_grad)
    inputs = second_moments(h, L)
    context_moments = second_moments(context, L, head.row_variances())
    h_second_cross = np.broadcast_to(np.asarray(h_cross, float) + h.mean**2, (L, L))
    a = head.mean_attention
    context_cross = d * sigma_v**2 * a @ h_second_cross @ a.T
    value_cross = a.T @ (d * sigma_o**2 * branch_grad_cross) @ a
    out = linear_weight_grad_sq(
        d, d, context_moments, branch_grad, batch, context_cross, branch_grad_cross
    )
    out += linear_weight_grad_sq(d, d, inputs, grads["value"], batch, h_second_cross, value_cross)
    out += linear_weight_grad_sq(d, d, inputs, np.diag(grads["query"] + grads["key"]), batch)
    return out


def ffn_weight_grad_sq(
    h: Signal,
    branch_grad: np.ndarray,
    batch: int,
    h_cross: np.ndarray | float,
    branch_grad_cross: np.ndarray,
    *,
    d: int,
    d_ff: int,
    sigma_1: float,
    sigma_2: float,
    activation: str = "relu",
    p: float = 0.0,
) -> float:
    """Summed E |dL/dW|^2 of the FFN's W_1 (input h) and W_2 (input: the activations),
    within and across sequences (`h_cross`: the (L, L) cross-sequence covariance of h)."""
    if p:
        raise ValueError(f"FFN-internal dropout is not modelled here, got p={p}")
    act_forward, act_backward = components.ACTIVATIONS[activation]
    length = branch_grad.shape[0]
    pre = components.linear_forward(h, d_in=d, d_out=d_ff, sigma_w=sigma_1)
    act = act_forward(pre)
    w1_backward = lambda g: act_backward(
        pre, components.linear_backward(act, g, d_in=d_ff, d_out=d, sigma_w=sigma_2)
    )
    into_w1 = tokenwise(w1_backward, branch_grad)
    into_w1_cross = cross_tokenwise(w1_backward, branch_grad_cross)

    def act_second_moment(corr: float) -> float:
        """Second moment (mean included, what W_2's gradient sees) of the activations of two
        tokens whose FFN inputs correlate `corr`."""
        pair = Signal(h.mean, h.var, corr)
        pre_cross = components.linear_forward(pair, d_in=d, d_out=d_ff, sigma_w=sigma_1)
        out = act_forward(with_cov(pre, pre_cross.cov))
        return out.cov + out.mean**2

    h_cross = np.broadcast_to(np.asarray(h_cross, float), (length, length))
    act_cross = entrywise(act_second_moment, h_cross / h.var)
    out = linear_weight_grad_sq(
        d_ff, d, second_moments(act, length), branch_grad, batch, act_cross, branch_grad_cross
    )
    return out + linear_weight_grad_sq(
        d, d_ff, second_moments(h, length), into_w1, batch, h_cross + h.mean**2, into_w1_cross
    )
