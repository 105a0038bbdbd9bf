"""Whole-model signal propagation, measured: the per-layer moments of the real LM at
initialization, and the prediction of model.py anchored on them.

Measured: the residual-stream variance, inter-token correlation and mean covariance between
the tokens of two sequences after each layer (read
through the `sow` hooks of nn/block.py), the gradient of the loss w.r.t. that stream (through
its `perturb` hooks) and per-layer weight-gradient norms, of a real `DecoderLM` or
`EncoderMLM` under its cross-entropy loss. `predicted_and_measured` runs theory/model.py's
`predict_lm` from the measured anchors (the embedding output, the top gradient).

Index convention (as model.py): profile[0] is the embedding output, profile[l] the residual
stream after layer l (1..N).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepscale_jax.metrics import token_cross_entropy
from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn.norms import partial_features
from deepscale_jax.nn.stack import per_layer_params
from deepscale_jax.theory.measure import (
    Grad,
    Signal,
    cross_sequence_covariance,
    estimate,
    token_covariance,
)
from deepscale_jax.theory.model import Profile, layer_gradient_steps, predict_lm
from deepscale_jax.theory.token_correlation import mean_moments, off_diagonal_mean

WEIGHT_NAMES = ("kernel",)


def _stack_profile(streams: list[jax.Array]) -> tuple[np.ndarray, np.ndarray]:
    """(variance, inter-token correlation) of each (B, T, d) stream; batch and features are the
    i.i.d. samples, as in the component measurements."""
    var, corr = [], []
    for stream in streams:
        _, v, c = estimate(stream, token_axis=-2)
        var.append(v)
        corr.append(c / v)
    return np.asarray(var), np.asarray(corr)


STACK_NAMES = ("decoder", "encoder")  # the layer stack of a decoder LM / an encoder (MLM, ViT)


def _stack(tree: dict) -> dict:
    """The one layer stack of a single-stack model's collection."""
    found = [name for name in STACK_NAMES if name in tree]
    if len(found) != 1:
        raise ValueError(f"expected one layer stack named one of {STACK_NAMES}, found {found}")
    return tree[found[0]]


def _layer_streams(tree: dict, num_layers: int, name: str) -> list[jax.Array]:
    """The per-layer arrays `name` of a sown/perturbation collection, either layout."""
    stack = _stack(tree)
    if "layers" in stack:
        value = stack["layers"][name]
        value = value[0] if isinstance(value, tuple) else value
        return [value[i] for i in range(num_layers)]
    out = []
    for i in range(num_layers):
        value = stack[f"layer_{i:03d}"][name]
        out.append(value[0] if isinstance(value, tuple) else value)
    return out


def weight_grad_norms(grads: dict, num_layers: int) -> np.ndarray:
    """sqrt(sum of squared gradients) over each layer's weight matrices (not biases, gains)."""
    norms = []
    for layer in per_layer_params(_stack(grads), num_layers):
        leaves = jax.tree_util.tree_flatten_with_path(layer)[0]
        total = sum(
            float(jnp.sum(jnp.square(leaf)))
            for path, leaf in leaves
            if getattr(path[-1], "key", None) in WEIGHT_NAMES
        )
        norms.append(np.sqrt(total))
    return np.asarray(norms)


def top_norm_passed_gradient(cfg: ModelConfig, grad: jax.Array, output: jax.Array) -> jax.Array:
    """The part of the top gradient that a Post-LN stack's topmost norm passes back.

    A scale-invariant norm at its init gain (LayerNorm, RMSNorm, ScaleNorm: N(c x) = N(x))
    has a symmetric Jacobian J with J y = 0 along its output y, so J^T annihilates the
    gradient's component along y_hat exactly. Below the top that component is already ~0
    (each block is homogeneous of degree 1 in its input). The topmost norm gets the raw loss
    gradient, whose component along y_hat is l_t . (p_t - e_target) / (n |y_t|) per token
    (l the logits, p the softmax, n the loss tokens): at init ~2% of a token's gradient
    energy, but ~14% of the part shared across tokens, which the mean-field norm map would
    keep and carry down the whole stack. Projecting it out makes the anchor what the top
    norm's backward actually receives. For pRMSNorm the annihilated direction is y's
    statistic part (its first k features). Pre-LN (the final norm sits above the measured
    stream) and norm-free stacks are returned unchanged.
    """
    if cfg.norm_placement != "post" or cfg.norm == "none":
        return grad
    direction = jnp.asarray(output, jnp.float32)
    if cfg.norm == "prms_norm":
        k = partial_features(cfg.d_model, cfg.norm_partial_fraction)
        direction = direction.at[..., k:].set(0.0)
    direction = direction / jnp.linalg.norm(direction, axis=-1, keepdims=True)
    along = jnp.sum(grad * direction, axis=-1, keepdims=True)
    return grad - along * direction


def measure_lm(
    model: nn.Module,
    params: dict,
    tokens: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
) -> Profile:
    """Per-layer forward and backward moments of the real LM (decoder LM or encoder MLM) under
    its cross-entropy loss, over the tokens `weights` selects (all by default; the masked
    positions for an MLM).

    Deterministic forward (no dropout) by default; with `dropout_rng` the training-mode forward
    with the config's dropout rates, one draw of the masks (the authors' figures: the first
    training step, dropout 0.1 / 0.1; theory.md 2.7). The gradient of the mean token
    cross-entropy w.r.t. the residual stream after each layer comes from zero perturbations
    added there (the same masks in the forward and the backward).
    """
    num_layers = model.config.num_layers
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))
    perturbations = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["perturbations"])
    training = {}
    if dropout_rng is not None:
        training = {"deterministic": False, "rngs": {"dropout": dropout_rng}}

    def loss_fn(p: dict, pert: dict) -> tuple[jax.Array, dict]:
        logits, state = model.apply(
            {"params": p, "perturbations": pert},
            tokens,
            mutable=["intermediates"],
            **training,
        )
        total, count = token_cross_entropy(logits, targets, weights)
        return total / count, state["intermediates"]

    grad_fn = jax.jit(jax.grad(loss_fn, argnums=(0, 1), has_aux=True))
    (param_grads, stream_grads), inter = grad_fn(params, perturbations)

    def with_embedding(tree: dict, name: str) -> list[jax.Array]:
        embed = tree["embed_out"]
        embed = embed[0] if isinstance(embed, tuple) else embed
        return [embed, *_layer_streams(tree, num_layers, name)]

    streams = with_embedding(inter, "residual")
    var, corr = _stack_profile(streams)
    grad_streams = with_embedding(stream_grads, "residual")
    grad_var, grad_corr = _stack_profile(grad_streams)
    by_position = np.asarray([np.var(np.asarray(s), axis=(0, 2)) for s in grad_streams])
    anchor = top_norm_passed_gradient(model.config, grad_streams[-1], streams[-1])
    cross = [cross_sequence_covariance(s) for s in streams]
    return Profile(
        var,
        corr,
        grad_var,
        grad_corr,
        weight_grad_norms(param_grads, num_layers),
        by_position,
        np.asarray([off_diagonal_mean(c) for c in cross]),
        token_covariance(anchor),
        cross_sequence_covariance(anchor),
        cross[0],
        np.asarray([token_covariance(s) for s in grad_streams]),
        np.asarray([cross_sequence_covariance(s) for s in grad_streams]),
    )


def predicted_and_measured(
    model: nn.Module,
    params: dict,
    tokens: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    dropout_rng: jax.Array | None = None,
) -> tuple[Profile, Profile]:
    """(prediction, measurement) for one LM at init; the prediction starts from the measured
    embedding output and the measured gradient at the top layer (the anchors of the laws).
    `dropout_rng`: measure in training mode (`measure_lm`); the prediction's dropout maps
    take the config's rates either way, so pass it whenever the config has dropout."""
    measured = measure_lm(model, params, tokens, targets, weights, dropout_rng)
    x0 = Signal(0.0, float(measured.var[0]), float(measured.corr[0]))
    g_top = Grad(float(measured.grad_var[-1]), float(measured.grad_corr[-1]))
    predicted = predict_lm(
        model.config,
        model.scheme,
        tokens.shape[1],
        x0,
        g_top,
        g_top_covariance=measured.top_grad_covariance,
        batch=tokens.shape[0],
        g_top_cross=measured.top_grad_cross,
        x0_cross=measured.embed_cross,
    )
    return predicted, measured


def gradient_step_decomposition(
    model: nn.Module, tokens: jax.Array, predicted: Profile, measured: Profile
) -> dict[str, np.ndarray]:
    """The predicted gradient variance's log error split layer by layer into the maps' own
    error and the drift of the predicted state (`predicted_and_measured`'s pair; per layer
    l = 1..N, arrays of length N, entry l - 1):
    - "map_error": log(S_{l-1} / M_{l-1}), S_{l-1} the theory's gradient variance at layer l's
      input given the *measured* (L, L) gradient state at its output
      (model.layer_gradient_steps), M the measured variance (mean of the covariance diagonal;
      the top state is the anchor, the gradient the top norm passes);
    - "state_term": log(P_{l-1} / P_l) - log(S_{l-1} / M_l), the predicted layer's gain on
      the predicted state minus the same map's gain on the measured state: what the
      predicted state's differences from the real one (its gradient correlation, chiefly)
      cost.
    Their sum over layers is exactly log(P_0 / M_0), the prediction's error at the stack input
    (telescoping; P_N = M_N, the anchor). Also "grad_corr_measured" (length N + 1) and
    "grad_corr_step" (N): the mean gradient correlation between tokens, measured and given by
    one layer's map from the measured state above it."""
    cfg = model.config
    state = np.array(measured.grad_covariances, float)
    state[-1] = measured.top_grad_covariance
    crosses = np.array(measured.grad_crosses, float)
    crosses[-1] = measured.top_grad_cross
    steps = layer_gradient_steps(
        cfg,
        model.scheme,
        tokens.shape[1],
        Signal(0.0, float(measured.var[0]), float(measured.corr[0])),
        state,
        crosses,
        tokens.shape[0],
        measured.embed_cross,
    )
    (meas, corr_meas), (step, corr_step) = (
        np.asarray([mean_moments(c) for c in covs]).T for covs in (state, steps)
    )
    pred = predicted.grad_var
    return {
        "map_error": np.log(step / meas[:-1]),
        "state_term": np.log(pred[:-1] / pred[1:]) - np.log(step / meas[1:]),
        "grad_corr_measured": corr_meas,
        "grad_corr_step": corr_step,
    }


def max_relative_error(predicted: np.ndarray, measured: np.ndarray) -> float:
    """max over layers of |predicted - measured| / measured."""
    return float(np.max(np.abs(predicted - measured) / np.abs(measured)))
