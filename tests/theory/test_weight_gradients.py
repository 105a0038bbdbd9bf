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


def test_same_position_excess_across_sequences_matches_monte_carlo():
    """B sequences sharing a component s (all tokens) and a per-position one p_t (the position
    embedding), with gradients sharing a per-position h_t: the cross-sequence term is
    B (B - 1) sum_tt' X^x_tt' G^x_tt' with X^x = X + diag(P). With X^x taken uniform (its
    off-diagonal value) the closed form misses 46% of the squared norm."""
    d_in, d_out, length, batch, draws = 8, 4, 6, 4, 4000
    shared, own, own_grad = 0.2, 0.5, 0.3
    same = np.linspace(0.5, 1.5, length)  # P_t
    grad_same = np.linspace(1.0, 0.2, length)  # G^x_tt: the gradients' per-position part
    keys = jax.random.split(jax.random.PRNGKey(1), 5)
    normal = lambda k, shape: jax.random.normal(k, (draws, *shape))
    x = (
        np.sqrt(shared) * normal(keys[0], (d_in, 1, 1))
        + np.sqrt(same) * normal(keys[1], (d_in, 1, length))
        + np.sqrt(own) * normal(keys[2], (d_in, batch, length))
    )
    g = np.sqrt(grad_same) * normal(keys[3], (d_out, 1, length)) + np.sqrt(own_grad) * normal(
        keys[4], (d_out, batch, length)
    )
    measured = float(jnp.mean(jnp.sum(jnp.einsum("nibt,njbt->nij", x, g) ** 2, axis=(1, 2))))
    inputs = shared + np.diag(same + own)
    grads = np.diag(grad_same + own_grad)
    grads_cross = np.diag(grad_same)
    predicted = linear_weight_grad_sq(
        d_in, d_out, inputs, grads, batch, shared + np.diag(same), grads_cross
    )
    np.testing.assert_allclose(measured, predicted, rtol=0.05)
    uniform = linear_weight_grad_sq(d_in, d_out, inputs, grads, batch, shared, grads_cross)
    assert uniform < 0.6 * measured
