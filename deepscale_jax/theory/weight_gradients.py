"""Expected squared norms of weight gradients at initialization, from token covariances.

For a linear map y = x W (W: d_in x d_out) applied to the T tokens of B sequences,
dL/dW = sum_n x_n^T g_n, and with x independent of the upstream gradient g (mean-field),

    E |dL/dW|_F^2 = d_in d_out [B sum_{t, t'} X_tt' G_tt' + B (B - 1) T^2 Xbar Gbar],

X_tt' = E[x_t x_t'] the per-feature token second-moment matrix of the input (mean included),
G_tt' = E[g_t g_t'] the per-feature token covariance of the output gradient. The second term is
the pairs of tokens from different sequences: at initialization every sequence is pushed
through the same weights, so the component all tokens share (the direction the stream
collapses onto, and the gradient of the loss on the average prediction) is shared across
sequences too. Measured on the real LM, the cross-sequence covariance equals the mean
within-sequence off-diagonal covariance for gradients (6.58e-12 vs 6.60e-12, 8-layer Pre-LN)
and is 20% lower for the stream (6.8 vs 8.3), so Xbar and Gbar are taken as the mean
off-diagonal entries of X and G. With B = 16 this term dominates once r is large. This is the
quantity the authors plot per layer (Kedia et al. 2024, sec. 5 figures; theory.md 2.7: sqrt of
the summed squared weight gradients of a layer).

Token covariances are (L, L) matrices: the gradient side comes position-resolved from
theory/model.py (causal stacks treat the first tokens very differently), the input side is
mean-field (equal variance and correlation for all tokens, except the attention context, whose
variance differs by query row).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from deepscale_jax.theory import attention, components
from deepscale_jax.theory.measure import Grad, Signal


def second_moments(x: Signal, length: int, row_var: np.ndarray | None = None) -> np.ndarray:
    """(L, L) matrix E[x_t x_t'] per feature: second moment on the diagonal (per row with
    `row_var`), covariance plus squared mean off it."""
    diag = x.var + x.mean**2 if row_var is None else np.asarray(row_var) + x.mean**2
    off = x.cov + x.mean**2
    return off * np.ones((length, length)) + np.diag(np.broadcast_to(diag - off, (length,)))


def tokenwise(backward: Callable[[Grad], Grad], cov: np.ndarray) -> np.ndarray:
    """A token-wise linear backward map applied to a token covariance matrix: its variance gain
    on the diagonal, its covariance gain off it (both read off the mean-field map)."""
    probe = backward(Grad(1.0, 0.5))
    var_gain, cov_gain = probe.var, probe.cov / 0.5
    return cov_gain * cov + (var_gain - cov_gain) * np.diag(np.diag(cov))


def _mean_off_diagonal(matrix: np.ndarray) -> float:
    length = matrix.shape[0]
    return float((np.sum(matrix) - np.trace(matrix)) / (length * (length - 1)))


def linear_weight_grad_sq(
    d_in: int, d_out: int, inputs: np.ndarray, grads: np.ndarray, batch: int
) -> float:
    """E |dL/dW|_F^2 over `batch` sequences of (L, L) token moments `inputs` (X), `grads` (G)
    (module docstring)."""
    length = inputs.shape[0]
    within = batch * np.sum(inputs * grads)
    across = (
        batch * (batch - 1) * length**2 * _mean_off_diagonal(inputs) * _mean_off_diagonal(grads)
    )
    return float(d_in * d_out * (within + across))


def attention_weight_grad_sq(
    h: Signal,
    branch_grad: np.ndarray,
    batch: int,
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
    `MultiHeadAttention`, from the token covariance of the gradient at its output. dQ and dK
    are taken as uncorrelated across tokens (attention.py, step 4)."""
    head = attention.mha_head(h, d, heads, L, sigma_q, sigma_k, sigma_v, p_attn, causal)
    context_var, context_cov = head.forward()
    context = Signal(0.0, context_var, context_cov / context_var if context_var > 0 else 0.0)
    context_grad = d * sigma_o**2 * branch_grad
    grads = head.projection_gradients(context_grad)
    inputs = second_moments(h, L)
    context_moments = second_moments(context, L, head.row_variances())
    out = linear_weight_grad_sq(d, d, context_moments, branch_grad, batch)
    out += linear_weight_grad_sq(d, d, inputs, grads["value"], batch)
    out += linear_weight_grad_sq(d, d, inputs, np.diag(grads["query"] + grads["key"]), batch)
    return out


def ffn_weight_grad_sq(
    h: Signal,
    branch_grad: np.ndarray,
    batch: int,
    *,
    d: int,
    d_ff: int,
    sigma_1: float,
    sigma_2: float,
    activation: str = "relu",
    p: float = 0.0,
) -> float:
    """Summed E |dL/dW|^2 of the FFN's W_1 (input h) and W_2 (input: the activations)."""
    if p:
        raise ValueError(f"FFN-internal dropout is not modelled here, got p={p}")
    act_forward, act_backward = components.ACTIVATIONS[activation]
    length = branch_grad.shape[0]
    pre = components.linear_forward(h, d_in=d, d_out=d_ff, sigma_w=sigma_1)
    act = act_forward(pre)
    into_w1 = tokenwise(
        lambda g: act_backward(
            pre, components.linear_backward(act, g, d_in=d_ff, d_out=d, sigma_w=sigma_2)
        ),
        branch_grad,
    )
    out = linear_weight_grad_sq(d_ff, d, second_moments(act, length), branch_grad, batch)
    return out + linear_weight_grad_sq(d, d_ff, second_moments(h, length), into_w1, batch)
