"""Whole-model signal propagation, predicted: the component maps composed along a model.

The component maps of components.py / attention.py composed along the decoder layer's block
structure (nn/block.py; one residual sublayer's maps: sublayer.py) for any scheme and for
Pre-LN and Post-LN, giving per layer the
residual-stream variance, inter-token correlation and gradient variance (Kedia et al. 2024,
sec. 3-4; theory.md 1.9-1.10), position-resolved gradients and weight-gradient norms. The
same quantities measured on the real model, and the two side by side: model_measure.py.

Index convention: profile[0] is the embedding output (the stack's input), profile[l] the
residual stream after layer l (1..N).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.theory.measure import Grad, Signal
from deepscale_jax.theory.sublayer import Sublayer, decoder_sublayers
from deepscale_jax.theory.token_correlation import (
    forward_covariance,
    mean_moments,
    off_diagonal_mean,
)
from deepscale_jax.theory.typical import typical_merge_factor


@dataclasses.dataclass(frozen=True)
class Profile:
    """Per-layer moments of the residual stream and its gradient (arrays of length N + 1), and
    per-layer weight-gradient norms (length N, None when not computed)."""

    var: np.ndarray
    corr: np.ndarray
    grad_var: np.ndarray
    grad_corr: np.ndarray
    weight_grad_norm: np.ndarray | None = None
    grad_var_by_position: np.ndarray | None = None  # (N + 1, L)
    cross: np.ndarray | None = None  # (N + 1,) mean covariance between tokens of two sequences
    top_grad_covariance: np.ndarray | None = None  # (L, L), measured: the backward anchor
    top_grad_cross: np.ndarray | None = None  # (L, L) across sequences, measured only
    embed_cross: np.ndarray | None = None  # (L, L) between sequences at the stack input, measured
    grad_covariances: np.ndarray | None = None  # (N + 1, L, L) gradient token covariances, measured
    grad_crosses: np.ndarray | None = None  # (N + 1, L, L) the same between sequences, measured

    def to_json(self) -> dict[str, list | None]:
        anchors = {
            "top_grad_covariance",
            "top_grad_cross",
            "embed_cross",
            "grad_covariances",
            "grad_crosses",
        }
        fields = [f.name for f in dataclasses.fields(self) if f.name not in anchors]
        return {
            name: (None if getattr(self, name) is None else getattr(self, name).tolist())
            for name in fields
        }


def _forward(
    cfg: ModelConfig, scheme: Any, seq_len: int, x0: Signal
) -> tuple[list[Signal], list[tuple[Sublayer, tuple]]]:
    """Residual-stream moments after each layer, and each sublayer with its backward cache."""
    x, forward, caches = x0, [x0], []
    for layer in range(cfg.num_layers):
        for sublayer in decoder_sublayers(cfg, scheme, layer, seq_len):
            x, cache = sublayer.forward(x)
            caches.append((sublayer, cache))
        forward.append(x)
    return forward, caches


ForwardState = tuple[np.ndarray, np.ndarray, np.ndarray]  # norm input vars, input cross, corr


def _forward_states(
    caches: list[tuple[Sublayer, tuple]], x0: Signal, seq_len: int, x0_cross: np.ndarray | float
) -> tuple[list[ForwardState], list[tuple[float, float]], list[float]]:
    """The position-resolved forward pass (`token_correlation.forward_covariance`): per
    sublayer, what its backward needs (the per-token norm input variances, the (L, L)
    covariance between sequences and the token correlation at its input); per layer, the
    stream's (mean variance, mean correlation) (`mean_moments`); per layer output and the
    embedding output, the stream's mean covariance between sequences."""
    cross = np.broadcast_to(np.asarray(x0_cross, float), (seq_len, seq_len))
    stream_cross = [off_diagonal_mean(cross)]
    tokens = x0.var * (x0.corr + (1 - x0.corr) * np.eye(seq_len))
    states, layer_moments = [], []
    for index, (sublayer, cache) in enumerate(caches):
        token_var = np.diag(tokens).copy()
        tokens, corr, norm_input = forward_covariance(sublayer, cache, tokens)
        cross, input_cross = sublayer.forward_cross(cache, cross, corr, token_var, norm_input)
        states.append((norm_input, input_cross, corr))
        if index % 2 == 1:  # a layer's output
            layer_moments.append(mean_moments(tokens))
            stream_cross.append(off_diagonal_mean(cross))
    return states, layer_moments, stream_cross


def _sublayer_backward(
    cfg: ModelConfig,
    sublayer: Sublayer,
    cache: tuple,
    state: ForwardState,
    cov: np.ndarray,
    grad_cross: np.ndarray,
    batch: int,
) -> tuple[np.ndarray, np.ndarray, float]:
    """One sublayer's position-resolved backward: the (L, L) gradient covariances within and
    between sequences at its input from those at its output, each times the typical merge
    factor (typical.py), and its weights' squared gradient norm (weight_gradients.py)."""
    norm_input, input_cross, corr = state
    cov_in, branch, share = sublayer.backward_covariance(
        cache, cov, norm_input, corr, off_diagonal_mean(input_cross)
    )
    typical = typical_merge_factor(
        share, cfg.d_model, sublayer.branch_width, cov, grad_cross, batch
    )
    cross_in, branch_cross = sublayer.backward_cross(cache, grad_cross, norm_input, input_cross)
    weight_sq = sublayer.weight_grad_sq(cache, branch, batch, input_cross, branch_cross)
    return cov_in * typical, cross_in * typical, weight_sq


def predict_lm(
    cfg: ModelConfig,
    scheme: Any,
    seq_len: int,
    x0: Signal,
    g_top: Grad,
    g_top_covariance: np.ndarray | None = None,
    batch: int = 1,
    g_top_cross: np.ndarray | None = None,
    x0_cross: np.ndarray | float = 0.0,
) -> Profile:
    """Predicted per-layer moments of a decoder LM at initialization.

    `x0` is the stack's input (embedding output) and `g_top` the gradient at the last layer's
    output (above it sit only the final norm and the head, which the per-layer laws do not
    involve). Forward: the sublayer maps in order; backward: in reverse, from g_top.

    With `g_top_covariance` (the (L, L) token covariance of the top gradient, per feature), the
    gradient is also propagated position-resolved (`Sublayer.backward_covariance`): in a causal
    stack token i attends to i + 1 tokens only, so the first tokens' gradients obey different
    laws from the rest (token 0's attention is a plain linear map) and the token average, which
    the measurement reports, is no longer the mean-field value. `grad_var` is then that
    average, `var` and `corr` are those of the (L, L) forward covariance
    (`token_correlation.mean_moments`: the first tokens keep more of their own value, which
    lowers the measured correlation below the mean-field one, 0.94 against 0.985 at the top of
    48 xavier Pre-LN layers, d = 256), and the per-layer weight-gradient norms for `batch`
    sequences are predicted as well (weight_gradients.py), from the cross-sequence moments
    anchored at `x0_cross` (the stack input's (L, L) covariance between the tokens of two
    sequences, or its uniform value) and `g_top_cross` ((L, L), the top gradient's).
    The position-resolved prediction is that of one typical model: Post-LN norms cross at their
    one-model gain and each residual merge multiplies the gradient energy by its typical
    realised gain (typical.py), so that it compares with single models and with geometric
    means over init seeds.
    """
    forward, caches = _forward(cfg, scheme, seq_len, x0)
    g, grads = g_top, [g_top]
    covs = None if g_top_covariance is None else [np.asarray(g_top_covariance, float)]
    stream = [(s.var, s.corr) for s in forward]
    stream_cross = None
    if covs is not None:
        states, layer_moments, stream_cross = _forward_states(caches, x0, seq_len, x0_cross)
        stream[1:] = layer_moments
        grad_cross = np.zeros((seq_len, seq_len)) if g_top_cross is None else g_top_cross
    weight_sq = np.zeros(cfg.num_layers)
    for index in range(len(caches) - 1, -1, -1):
        sublayer, cache = caches[index]
        g = sublayer.backward(cache, g)
        if covs is not None:
            cov, grad_cross, sq = _sublayer_backward(
                cfg, sublayer, cache, states[index], covs[-1], grad_cross, batch
            )
            covs.append(cov)
            weight_sq[index // 2] += sq
        if index % 2 == 0:  # the input of an attention sublayer = the output of a layer
            grads.append(g)
    grads.reverse()
    grad_var = np.asarray([g.var for g in grads])
    per_position, weight_grad_norm = None, None
    if covs is not None:
        weight_grad_norm = np.sqrt(weight_sq)
        layer_covs = covs[::2][::-1]  # layer outputs: every 2nd sublayer, bottom up
        per_position = np.asarray([np.diag(c) for c in layer_covs])
        grad_var = per_position.mean(axis=1)
    return Profile(
        var=np.asarray([v for v, _ in stream]),
        corr=np.asarray([c for _, c in stream]),
        grad_var=grad_var,
        grad_corr=np.asarray([g.corr for g in grads]),
        weight_grad_norm=weight_grad_norm,
        grad_var_by_position=per_position,
        cross=None if stream_cross is None else np.asarray(stream_cross),
    )


def layer_gradient_steps(
    cfg: ModelConfig,
    scheme: Any,
    seq_len: int,
    x0: Signal,
    grad_covariances: np.ndarray,
    grad_crosses: np.ndarray,
    batch: int,
    x0_cross: np.ndarray | float = 0.0,
) -> np.ndarray:
    """Each layer's position-resolved backward map applied to a given gradient state at its
    output, not to the predicted one: `grad_covariances` and `grad_crosses` ((N + 1, L, L),
    index as Profile) are the gradient's token covariances within and between sequences after
    each layer (measured ones, say); returns (N, L, L), entry l - 1 the covariance at layer l's
    input that the theory gives from entry l of the state (l = 1..N). Fed the measurement,
    this separates the maps' own error from the drift of the predicted state
    (model_measure.gradient_step_decomposition)."""
    _, caches = _forward(cfg, scheme, seq_len, x0)
    states, _, _ = _forward_states(caches, x0, seq_len, x0_cross)
    out = []
    for layer in range(1, cfg.num_layers + 1):
        cov = np.asarray(grad_covariances[layer], float)
        cross = np.asarray(grad_crosses[layer], float)
        for index in (2 * layer - 1, 2 * layer - 2):  # the FFN sublayer, then attention
            sublayer, cache = caches[index]
            cov, cross, _ = _sublayer_backward(
                cfg, sublayer, cache, states[index], cov, cross, batch
            )
        out.append(cov)
    return np.asarray(out)
