"""theory/components.py's RMSNorm, pRMSNorm and ScaleNorm moment maps against nn/norms.py.

Each case draws inputs with chosen (mean, variance, inter-token correlation) and an output
gradient with chosen (variance, correlation), runs the module forward and `jax.vjp` backward
(theory/measure.py `measure`), and compares the five statistics with the closed forms.

Tolerances. The maps are second-order delta-method expansions, exact up to O(1/d^2) ~ 1e-4 at
d = 128, so the error budget is Monte Carlo noise. The tokens of one run share a component, so
the independent draws are the RUNS x D = 51,200 (run, feature) pairs, and a variance (of the
output, or of the input gradient) has a relative standard error of about sqrt(2/N) ~= 0.6%. For
shifted inputs the output variance is E y^2 - mu_y^2 with E y^2 fixed (sum_f y_f^2 = d per
token), so the error of the mean enters it amplified by 2 |mu_y|/s_y^2: up to 1.7% seen at
mu = -3 over two seeds. Hence 4% on variances (every other case: <= 1.3% seen); 0.02 absolute
on correlations (standard error <= (1 + r^2)/sqrt(N) ~= 0.009 per estimate before the L(L - 1)
pair average; <= 0.004 seen); 0.02 output standard deviations on means (<= 0.005 seen). A wrong
map misses by far more: at mu = -3, s = 1 LayerNorm's map predicts variance 1, RMSNorm's 0.1.
The keys are fixed, so a pass is deterministic.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

from deepscale_jax.nn.norms import PartialRMSNorm, RMSNorm, ScaleNorm, partial_features
from deepscale_jax.theory import components as C
from deepscale_jax.theory import measure as M
from deepscale_jax.theory.measure import Grad, Signal

RUNS, LENGTH, D = 400, 8, 128
EPS = 1e-5
VAR_RTOL, CORR_ATOL, MEAN_ATOL = 0.04, 0.02, 0.02

# (input mean, var, correlation), (gradient var, correlation): centred and shifted inputs,
# small and large variances against eps, uncorrelated to strongly correlated tokens.
MOMENTS = [
    (Signal(0.0, 1.0, 0.0), Grad(1.0, 0.0)),
    (Signal(0.0, 4.0, 0.5), Grad(0.5, 0.4)),
    (Signal(1.0, 0.25, 0.3), Grad(2.0, 0.8)),
    (Signal(-3.0, 1.0, 0.8), Grad(1.0, 0.2)),
    (Signal(0.0, 1e-4, 0.6), Grad(1.0, 0.5)),  # mean square 1e-4 next to eps = 1e-5
]


def _fn(module, params=None):
    params = params or module.init(jax.random.PRNGKey(0), jnp.zeros((1, D)))
    return jax.jit(lambda x: module.apply(params, x))


def _check(measured: dict[str, float], x: Signal, g: Grad) -> None:
    """Measured statistics (covariances) against predicted moments (correlations)."""
    x_var, g_var = measured["x var"], measured["g var"]
    assert x_var == pytest.approx(x.var, rel=VAR_RTOL), (measured, x)
    assert g_var == pytest.approx(g.var, rel=VAR_RTOL), (measured, g)
    assert abs(measured["x mean"] - x.mean) <= MEAN_ATOL * math.sqrt(x.var), (measured, x)
    assert measured["x cov"] / x_var == pytest.approx(x.corr, abs=CORR_ATOL), (measured, x)
    assert measured["g cov"] / g_var == pytest.approx(g.corr, abs=CORR_ATOL), (measured, g)


@pytest.mark.parametrize(("x", "g"), MOMENTS)
def test_rmsnorm_maps_match_the_module(x: Signal, g: Grad) -> None:
    measured = M.measure(_fn(RMSNorm(eps=EPS)), jax.random.PRNGKey(11), (RUNS, LENGTH, D), x, g)
    _check(measured, C.rmsnorm_forward(x, d=D, eps=EPS), C.rmsnorm_backward(x, g, d=D, eps=EPS))


@pytest.mark.parametrize("gain", [None, 0.5])
@pytest.mark.parametrize(("x", "g"), MOMENTS[1:4])
def test_scalenorm_maps_match_the_module(x: Signal, g: Grad, gain: float | None) -> None:
    """At init (g = sqrt(d)) and after the scalar gain moved; the maps ignore the clamp eps,
    which never binds here (||x|| >= 1e-3 * sqrt(d) >> eps)."""
    params = None if gain is None else {"params": {"scale": jnp.float32(gain)}}
    fn = _fn(ScaleNorm(eps=EPS), params)
    measured = M.measure(fn, jax.random.PRNGKey(12), (RUNS, LENGTH, D), x, g)
    _check(
        measured,
        C.scalenorm_forward(x, d=D, gain=gain),
        C.scalenorm_backward(x, g, d=D, gain=gain),
    )


@pytest.mark.parametrize("fraction", [0.0625, 0.5])
@pytest.mark.parametrize(("x", "g"), MOMENTS[:4])
def test_partial_rmsnorm_maps_match_the_module(x: Signal, g: Grad, fraction: float) -> None:
    """pRMSNorm: the statistic over the first k features, applied to all d."""
    k = partial_features(D, fraction)
    fn = _fn(PartialRMSNorm(eps=EPS, partial_fraction=fraction))
    measured = M.measure(fn, jax.random.PRNGKey(13), (RUNS, LENGTH, D), x, g)
    _check(
        measured,
        C.prmsnorm_forward(x, d=D, k=k, eps=EPS),
        C.prmsnorm_backward(x, g, d=D, k=k, eps=EPS),
    )
