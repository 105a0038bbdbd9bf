"""Whole-model measurement (layout-independent) and prediction against the real LM."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models.lm import DecoderLM
from deepscale_jax.nn.norms import norm_from_config, partial_features
from deepscale_jax.schemes import build_scheme
from deepscale_jax.theory import attention, attention_positions
from deepscale_jax.theory.measure import Grad, Signal, estimate
from deepscale_jax.theory.model_measure import (
    gradient_step_decomposition,
    max_relative_error,
    measure_lm,
    predicted_and_measured,
    top_norm_passed_gradient,
)
from deepscale_jax.theory.sublayer import decoder_sublayers
from deepscale_jax.theory.token_correlation import mean_moments
from tests.helpers import init_params, tiny_lm, tokens


@pytest.mark.slow  # 30 s; scanned == unrolled itself is tested in tests/nn/test_stack.py
def test_measurement_is_the_same_for_scanned_and_unrolled_layouts():
    toks = tokens(batch=8)
    targets = jax.numpy.roll(toks, -1, axis=1)
    profiles = []
    for scan in (True, False):
        model = tiny_lm(scan_layers=scan, num_layers=4)
        profiles.append(measure_lm(model, init_params(model, toks), toks, targets))
    a, b = profiles
    for name in ("var", "corr", "grad_var", "grad_corr", "weight_grad_norm"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-4, err_msg=name)
    assert a.var.shape == (5,) and a.weight_grad_norm.shape == (4,)


def test_measured_pre_ln_variance_grows_linearly_with_depth():
    """Vanilla Pre-LN (lambda = beta = 1): each layer adds about the same variance
    (Kedia et al. 2024, Pre-LN forward Theta(N))."""
    toks = tokens(batch=8, length=16)
    model = tiny_lm(num_layers=24, d_model=64, d_ff=256)
    prof = measure_lm(model, init_params(model, toks), toks, jax.numpy.roll(toks, -1, axis=1))
    layers = np.arange(1, 25)
    slope, intercept = np.polyfit(layers, prof.var[1:], 1)
    fit = slope * layers + intercept
    r2 = 1 - np.sum((prof.var[1:] - fit) ** 2) / np.sum((prof.var[1:] - prof.var[1:].mean()) ** 2)
    assert 1.0 < slope < 4.0 and r2 > 0.98, (slope, r2)


# ----------------------------------------------------------- prediction against the real LM


@pytest.fixture(scope="module")
def text(data_dir):
    """16 windows of 64 bytes of Shakespeare validation text (inputs, targets)."""
    from experiments.signal_propagation import text_batch

    return text_batch(16, 64, data_dir)


def _model(placement: str) -> DecoderLM:
    cfg = ModelConfig(
        num_layers=16, d_model=64, num_heads=2, d_ff=256, max_len=64, norm_placement=placement
    )
    return DecoderLM(cfg, build_scheme({"name": "xavier"}, cfg))


@pytest.fixture(scope="module")
def profiles(text):
    """placement -> (predicted, measured) of the 16-layer model, each computed once."""
    cache = {}

    def get(placement: str):
        if placement not in cache:
            tokens_, targets = text
            model = _model(placement)
            params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens_))
            cache[placement] = predicted_and_measured(model, params["params"], tokens_, targets)
        return cache[placement]

    return get


def test_pre_ln_prediction_matches_the_real_lm(profiles):
    """16-layer xavier Pre-LN byte LM: forward variance within 12% at every layer (measured
    7.8%), gradient variance within 25% (the issue's target) from layer 2 up (measured: 24.0%
    at layer 3, with the non-exchangeable causal keys of attention_positions.key_tilts; 33% without
    them), the correlation, read off the position-resolved covariance as the measurement
    does (`token_correlation.mean_moments`), within 0.04 (measured 0.026), and the mean
    covariance between sequences within 20% (measured 15.6%; 52% when attention passes it
    as one value for all pairs of positions)."""
    predicted, measured = profiles("pre")
    assert max_relative_error(predicted.var, measured.var) < 0.12
    assert max_relative_error(predicted.grad_var[2:], measured.grad_var[2:]) < 0.25
    np.testing.assert_allclose(predicted.corr[1:], measured.corr[1:], atol=0.04)
    assert max_relative_error(predicted.cross[1:], measured.cross[1:]) < 0.2
    layers = np.arange(1, 17)  # the linear law, measured and predicted
    for profile in (measured, predicted):
        slope, intercept = np.polyfit(layers, profile.var[1:], 1)
        residual = profile.var[1:] - (slope * layers + intercept)
        assert slope > 0.5 and np.std(residual) < 0.1 * np.ptp(profile.var[1:])


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_gradient_step_decomposition_adds_up_to_the_prediction_error(text, profiles, placement):
    """Per layer, the theory's map fed the measured gradient state above it (the maps' own
    error) and the same map's gain on the predicted state against the measured one (the
    state's drift) sum to the prediction's log error at the stack input, exactly (they
    telescope); at the top both states are the anchor. One layer's map from the measured
    state also carries the gradient correlation between tokens to within 0.03 of the
    measurement at every layer (measured: 0.02 in both placements)."""
    predicted, measured = profiles(placement)
    parts = gradient_step_decomposition(_model(placement), text[0], predicted, measured)
    bottom = np.diagonal(measured.grad_covariances[0]).mean()
    total = np.sum(parts["map_error"] + parts["state_term"])
    assert total == pytest.approx(np.log(predicted.grad_var[0] / bottom), rel=1e-6, abs=1e-9)
    assert abs(parts["state_term"][-1]) < 1e-9
    np.testing.assert_allclose(parts["grad_corr_step"], parts["grad_corr_measured"][:-1], atol=0.03)


def test_post_ln_gradients_vanish_geometrically_except_at_the_first_token(profiles):
    """Post-LN (Kedia et al. 2024 sec. 4): away from the first tokens the gradient shrinks
    geometrically toward the input, in the measurement and in the position-resolved
    prediction (log10 decay within 35%); token 0, whose causal attention row is a plain
    linear map, keeps its gradient."""
    predicted, measured = profiles("post")
    bulk = lambda p: np.log10(p.grad_var_by_position[1, 32:].mean())
    top = lambda p: np.log10(p.grad_var_by_position[-1, 32:].mean())
    measured_decay, predicted_decay = (
        top(measured) - bulk(measured),
        top(predicted) - bulk(predicted),
    )
    assert measured_decay > 2.5, measured_decay  # > 300x over 15 layers
    assert abs(predicted_decay / measured_decay - 1) < 0.35, (predicted_decay, measured_decay)
    assert measured.grad_var_by_position[1, 0] > measured.grad_var_by_position[-1, 0]
    assert predicted.grad_var_by_position[1, 0] > predicted.grad_var_by_position[-1, 0]
    np.testing.assert_allclose(predicted.var, measured.var, rtol=1e-3)
    np.testing.assert_allclose(predicted.corr[1:], measured.corr[1:], atol=0.1)
    # the mean covariance between sequences: 11.3% measured (23% passed as one value)
    assert max_relative_error(predicted.cross[1:], measured.cross[1:]) < 0.2


@pytest.mark.parametrize("causal", [True, False])
def test_position_resolved_attention_backward_averages_to_the_mean_field(causal):
    """With uncorrelated, equal per-token gradients the token covariance map's mean diagonal
    and mean off-diagonal are exactly the mean-field gradient variance and covariance: the
    families of token vectors that sum to 0 (the key path, the value-key cross term, the
    attention weights' fluctuation over a row) carry their negative covariance off the
    diagonal (`zero_sum_off_diagonal`; on the diagonal alone the covariance was 4-10% high
    here and the gradient correlation of a Post-LN stack 0.002 high)."""
    x = Signal(0.0, 1.0, 0.5)
    kw = dict(d=128, heads=4, L=48, sigma_q=0.1, sigma_k=0.12, sigma_v=0.1, sigma_o=0.09)
    cov = attention_positions.mha_backward_covariance(
        x, 2.0 * np.eye(48), p_attn=0.1, causal=causal, **kw
    )
    mean_field = attention.mha_backward(x, Grad(2.0, 0.0), p_attn=0.1, causal=causal, **kw)
    np.testing.assert_allclose(np.mean(np.diag(cov)), mean_field.var, rtol=1e-10)
    off = ~np.eye(48, dtype=bool)
    np.testing.assert_allclose(np.mean(cov[off]), mean_field.cov, rtol=1e-10)


def test_zero_sum_covariance_sums_to_zero():
    """Token vectors that sum to 0: every family's entries sum to 0, rows nearly so, and equal
    variances give the exchangeable covariance -k/(L-1)."""
    k = np.array([4.0, 1.0, 0.5, 0.5, 2.0])
    cov = attention_positions.zero_sum_covariance(k)
    np.testing.assert_allclose(np.diag(cov), k)
    assert abs(cov.sum()) < 1e-12
    total, squares = k.sum(), np.sum(k**2)
    row_sums = k * (k - squares / total) / (total - squares / total)
    np.testing.assert_allclose(cov.sum(axis=1), row_sums, rtol=1e-12)
    equal = attention_positions.zero_sum_covariance(np.full(6, 3.0))
    np.testing.assert_allclose(equal[0, 1:], -3.0 / 5, rtol=1e-12)
    np.testing.assert_allclose(equal.sum(axis=1), 0.0, atol=1e-12)
    with np.errstate(all="raise"):  # all of a family's variance on one token: no off-diagonal
        single = attention_positions.zero_sum_covariance(np.array([0.0, 0.0, 2.0]))
    np.testing.assert_array_equal(single, np.diag([0.0, 0.0, 2.0]))
    families = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    off = attention_positions.zero_sum_off_diagonal(families, np.array([2.0, 5.0]))
    np.testing.assert_allclose(
        off, 2.0 * (attention_positions.zero_sum_covariance(families[0]) - np.diag(families[0]))
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("r, r_g", [(0.865, 0.54), (0.5, 0.3)])
def test_position_resolved_attention_backward_keeps_the_row_pair_terms(causal, r, r_g):
    """With correlated gradients on exchangeable tokens the token covariance map agrees with
    the mean-field backward, which the real module confirms (attention_sweeps.MHACase, 4
    draws: variance 1.547 measured, 1.525 mean-field at r = 0.865, r_g = 0.54, bidirectional):
    the pairs of rows that favour the same keys add to its diagonal. Without them (value path
    `_row_pair_fluctuation`, key path `key_pair_factor`) the map's mean variance was 1.14 and
    its gradient correlation 0.77 there, against 0.55 measured."""
    from deepscale_jax.theory.attention_sweeps import xavier_stds

    x, length = Signal(0.0, 1.0, r), 128
    kw = dict(d=128, heads=4, L=length, p_attn=0.0, causal=causal, **xavier_stds(128, 4))
    cov = attention_positions.mha_backward_covariance(
        x, r_g + (1 - r_g) * np.eye(length), corr=r + (1 - r) * np.eye(length), **kw
    )
    mean_field = attention.mha_backward(x, Grad(1.0, r_g), **kw)
    off = ~np.eye(length, dtype=bool)
    np.testing.assert_allclose(np.mean(np.diag(cov)), mean_field.var, rtol=0.03)
    np.testing.assert_allclose(np.mean(cov[off]), mean_field.var * mean_field.corr, rtol=0.03)


@pytest.mark.parametrize("causal", [True, False])
def test_token_correlation_maps_reduce_to_the_mean_field_for_exchangeable_tokens(causal):
    """With a uniform input correlation r (exchangeable keys) the position-resolved forward
    covariance averages to the mean-field moments, the key tilts vanish and the backward
    covariance is the one without `corr`."""
    x = Signal(0.0, 1.0, 0.6)
    kw = dict(d=128, heads=4, L=48, sigma_q=0.1, sigma_k=0.12, sigma_v=0.1, sigma_o=0.09)
    uniform = 0.6 + 0.4 * np.eye(48)
    mean_attention, tilt2, centred = attention_positions.key_tilts(uniform, 1.7, causal)
    seen = np.tril(np.ones((48, 48))) if causal else np.ones((48, 48))
    n = seen.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(mean_attention, seen / n, atol=1e-12)
    np.testing.assert_allclose(tilt2, seen, atol=1e-12)
    np.testing.assert_allclose(centred, 0.4 * (1 - 1 / n) * seen, atol=1e-12)
    cov = attention_positions.mha_forward_covariance(x, uniform, p_attn=0.1, causal=causal, **kw)
    mean_field = attention.mha_forward(x, p_attn=0.1, causal=causal, **kw)
    off = ~np.eye(48, dtype=bool)
    np.testing.assert_allclose(np.mean(np.diag(cov)), mean_field.var, rtol=1e-10)
    np.testing.assert_allclose(np.mean(cov[off]), mean_field.cov, rtol=1e-8)
    grad = 2.0 * np.eye(48)
    with_corr = attention_positions.mha_backward_covariance(
        x, grad, p_attn=0.1, causal=causal, corr=uniform, **kw
    )
    without = attention_positions.mha_backward_covariance(x, grad, p_attn=0.1, causal=causal, **kw)
    np.testing.assert_allclose(with_corr, without, rtol=1e-10)


def test_first_tokens_draw_more_attention_when_less_correlated():
    """A causal row attends more, and with larger fluctuations, to a key that is less
    correlated with the others (attention_positions.key_tilts): token 0 of a stack whose later
    tokens share a common component."""
    corr = 0.9 + 0.1 * np.eye(32)
    corr[0, 1:] = corr[1:, 0] = 0.5
    mean_attention, tilt2, _ = attention_positions.key_tilts(corr, 2.5, causal=True)
    np.testing.assert_allclose(mean_attention.sum(axis=1), 1.0)
    assert mean_attention[-1, 0] > 1.5 / 32 and tilt2[-1, 0] > 4 * tilt2[-1, 5]
    assert np.isclose(mean_attention[-1, 5], mean_attention[-1, 6])


@pytest.mark.parametrize("norm", ["layer_norm", "rms_norm", "prms_norm", "scale_norm"])
def test_top_norm_anchor_drops_exactly_what_the_norm_backward_annihilates(norm):
    """Post-LN anchor (`top_norm_passed_gradient`): the real norm's vjp of the raw gradient
    equals its vjp of the projected one, and the projection removes a real component (the
    raw gradient is given one along the output direction)."""
    cfg = ModelConfig(
        d_model=64,
        num_heads=2,
        d_ff=128,
        norm=norm,
        norm_placement="post",
        norm_partial_fraction=0.0625,
        norm_eps=1e-12,  # the identity is exact at eps = 0 (eps breaks scale invariance)
    )
    module = norm_from_config(cfg, None)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 64)) * 1.7 + 0.3
    params = module.init(jax.random.PRNGKey(1), x)
    y, vjp = jax.vjp(lambda v: module.apply(params, v), x)
    along = y if norm != "prms_norm" else y.at[..., partial_features(64, 0.0625) :].set(0.0)
    along = along / jax.numpy.linalg.norm(along, axis=-1, keepdims=True) * 8.0  # unit per entry
    raw = jax.random.normal(jax.random.PRNGKey(2), y.shape) + along
    passed = top_norm_passed_gradient(cfg, raw, y)
    assert float(np.mean(np.square(raw - passed))) > 0.3 * float(np.mean(np.square(raw)))
    np.testing.assert_allclose(vjp(passed)[0], vjp(raw)[0], atol=2e-5)
    pre = ModelConfig(d_model=64, num_heads=2, d_ff=128, norm=norm, norm_placement="pre")
    assert top_norm_passed_gradient(pre, raw, y) is raw


def test_post_ln_norm_keeps_only_the_token_specific_jensen_boost():
    """Post-LN norms cross the gradient at the one-model gain (`typical_norm_gain`):
    1/E[sigma^2] when the norm's input is common to all sequences (rho = 1), and
    (1 + 2/(d - 1))/E[sigma^2] for LayerNorm, the mean-field E[1/sigma^2] without projection
    loss, when tokens of different sequences are uncorrelated and the input is Gaussian
    (kappa = 1: layer 0's attention sublayer, below any norm). The within- and cross-sequence
    covariances take the same gain; Pre-LN ignores the cross-sequence input."""
    L, d = 16, 64
    cov = 0.3 * np.ones((L, L)) + 0.5 * np.eye(L)
    for placement in ("post", "pre"):
        cfg = ModelConfig(num_layers=2, d_model=d, num_heads=2, d_ff=256, max_len=L)
        cfg = dataclasses.replace(cfg, norm_placement=placement)
        attn = decoder_sublayers(cfg, build_scheme({"name": "xavier"}, cfg), 0, L)[0]
        norm_only = dataclasses.replace(attn, beta=0.0)  # the residual path: lam^2 x norm
        x = Signal(0.0, 1.7, 0.9)
        _, cache = norm_only.forward(x)
        norm_input = np.full(L, cache[1].var)
        gains = {}
        for rho in (1.0, 0.0):
            within = norm_only.backward_covariance(cache, cov, norm_input, None, rho * x.var)[0]
            cross = norm_only.backward_cross(cache, cov, norm_input, rho * x.var)[0]
            np.testing.assert_allclose(within, cross, rtol=1e-12)
            gains[rho] = within / cov
        if placement == "pre":
            np.testing.assert_array_equal(gains[1.0], gains[0.0])
            continue
        unit = norm_only.lam**2 / (cache[1].var + cfg.norm_eps)
        np.testing.assert_allclose(gains[1.0], unit, rtol=1e-12)
        np.testing.assert_allclose(gains[0.0], unit * (1 + 2 / (d - 1)), rtol=1e-12)


def test_ffn_cross_sequence_gradient_takes_the_cross_sequence_relu_overlap():
    """The FFN's backward on the gradient covariance between sequences uses the correlation
    between sequences at its input, pair by pair: at the within-sequence correlation it is the
    within-sequence covariance gain (to the correlation grid's interpolation), and it falls as
    the sequences decorrelate (fewer ReLU units active in both; shattered gradients)."""
    L, d = 8, 64
    cfg = ModelConfig(num_layers=2, d_model=d, num_heads=2, d_ff=256, max_len=L)
    ffn = decoder_sublayers(cfg, build_scheme({"name": "xavier"}, cfg), 1, L)[1]
    ffn_only = dataclasses.replace(ffn, lam=0.0)  # the branch path alone
    x = Signal(0.0, 1.0, 0.8)
    _, cache = ffn_only.forward(x)
    h = cache[1]
    cross = np.ones((L, L))
    gains = [
        ffn_only.backward_cross(cache, cross, np.full(L, x.var), c * h.var)[0][0, 0]
        for c in (h.corr, 0.5, 0.0)
    ]
    within = ffn_only.backward_covariance(cache, cross, np.full(L, x.var))[0][0, 1]
    assert np.isclose(gains[0], within, rtol=1e-3)
    assert gains[0] > gains[1] > gains[2] > 0
    pairs = np.full((L, L), 0.5 * h.var)  # same-position pairs correlate as within a sequence
    np.fill_diagonal(pairs, h.corr * h.var)
    by_pair = ffn_only.backward_cross(cache, cross, np.full(L, x.var), pairs)[0]
    np.testing.assert_allclose([by_pair[0, 0], by_pair[0, 1]], gains[:2], rtol=1e-9)


def test_mean_moments_is_what_the_measurement_estimates():
    """`token_correlation.mean_moments` of a token covariance C equals `measure.estimate` on
    samples drawn with covariance C; tokens of unequal variance (a causal stack's first tokens)
    lower it below the mean pairwise correlation."""
    length, samples = 8, 200_000
    std = np.linspace(2.0, 0.5, length)
    corr = 0.9 + 0.1 * np.eye(length)
    cov = corr * np.outer(std, std)
    draws = jax.random.multivariate_normal(
        jax.random.PRNGKey(0), jnp.zeros(length), jnp.asarray(cov), (samples,)
    )
    _, var, off = estimate(draws[:, None, :], token_axis=-1)
    predicted_var, predicted_corr = mean_moments(cov)
    np.testing.assert_allclose([var, off / var], [predicted_var, predicted_corr], rtol=0.02)
    assert predicted_corr < 0.85  # every pair correlates 0.9
