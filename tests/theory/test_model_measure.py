"""Whole-model measurement hooks: layout-independent, and the measured Pre-LN law."""

import jax
import numpy as np

from deepscale_jax.theory.model import measure_lm
from tests.helpers import init_params, tiny_lm, tokens


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
