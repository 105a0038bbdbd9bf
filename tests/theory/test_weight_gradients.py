"""Weight-gradient norms: the closed form against Monte Carlo of x^T g."""

import jax
import jax.numpy as jnp
import numpy as np

from deepscale_jax.theory.measure import Grad, Signal, sample_equicorrelated
from deepscale_jax.theory.weight_gradients import linear_weight_grad_sq, second_moments


def test_linear_weight_gradient_norm_matches_monte_carlo():
    """E|x^T g|_F^2 for one sequence of correlated tokens (inputs with a mean) and correlated
    gradients: d_in d_out sum X_tt' G_tt'."""
    d_in, d_out, length, draws = 16, 8, 12, 4000
    x_moments, g_moments = Signal(0.3, 1.5, 0.6), Grad(2.0, 0.25)
    kx, kg = jax.random.split(jax.random.PRNGKey(0))
    x = sample_equicorrelated(kx, (draws, d_in, length, 1), x_moments, token_axis=-2)[..., 0]
    g = sample_equicorrelated(kg, (draws, d_out, length, 1), g_moments, token_axis=-2)[..., 0]
    measured = float(jnp.mean(jnp.sum(jnp.einsum("nit,njt->nij", x, g) ** 2, axis=(1, 2))))
    grads = second_moments(Signal(0.0, g_moments.var, g_moments.corr), length)
    predicted = linear_weight_grad_sq(d_in, d_out, second_moments(x_moments, length), grads, 1)
    np.testing.assert_allclose(measured, predicted, rtol=0.05)
