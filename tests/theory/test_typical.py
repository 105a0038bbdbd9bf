"""One model's typical moments (theory/typical.py): the participation of a set of gradients, and
the spread of the gradient energy at a residual merge over draws of the real branch modules."""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepscale_jax.nn.attention import MultiHeadAttention
from deepscale_jax.nn.initializers import LayerInit, normal
from deepscale_jax.nn.mlp import MLP
from deepscale_jax.theory.typical import inverse_participation, merge_relative_variance


def test_inverse_participation_is_that_of_the_explicit_gram_matrix():
    """tr G^2 / tr(G)^2 of the (B L, B L) Gram matrix built entry by entry, and its limits."""
    rng = np.random.default_rng(0)
    length, batch = 5, 3
    a = rng.normal(size=(length, 2 * length))
    cov = a @ a.T / (2 * length)
    b = rng.normal(size=(length, 2 * length))
    cross = 0.3 * (a @ b.T + b @ a.T) / (4 * length)  # symmetric, smaller than cov
    gram = np.kron(np.eye(batch), cov - cross) + np.kron(np.ones((batch, batch)), cross)
    expected = np.trace(gram @ gram) / np.trace(gram) ** 2
    assert inverse_participation(cov, cross, batch) == pytest.approx(expected, rel=1e-12)
    ones = np.ones((length, length))  # every vector the same: one direction
    assert inverse_participation(ones, ones, batch) == pytest.approx(1.0)
    eye = np.eye(length)  # B L orthogonal vectors of equal norm
    assert inverse_participation(eye, 0 * eye, batch) == pytest.approx(1 / (batch * length))


def _branch(kind: str, d: int):
    """(apply(keys, x, g) -> J^T g per draw, bottleneck width, shared relative variance) for
    the real module at std 1/sqrt(d)."""
    init = LayerInit(types.SimpleNamespace(init=lambda role, layer: normal(d**-0.5)))
    if kind == "attention":
        module = MultiHeadAttention(4)
        call = lambda params, x: nn.meta.unbox(module.apply(params, x, None, init))
        make = lambda key, x: module.init(key, x, None, init)
        width, shared = d, 0.0
    else:
        module = MLP(2 * d)
        call = lambda params, x: nn.meta.unbox(module.apply(params, x, init))
        make = lambda key, x: module.init(key, x, init)
        width, shared = d, 1 / (2 * d)  # active: half of 2 d ReLU units, Binomial in count

    def vjp(key: jax.Array, x: jax.Array, g: jax.Array) -> jax.Array:
        params = make(key, x)
        return jax.vjp(lambda y: call(params, y), x)[1](g)[0]

    return jax.jit(jax.vmap(vjp, in_axes=(0, None, None))), width, shared


@pytest.mark.parametrize("kind", ["attention", "ffn"])
def test_merge_energy_spread_over_draws_of_the_real_branch(kind):
    """|lam g + beta J^T g|^2 over 2000 draws of the real attention block and FFN, on a collapsed
    input (every token the same vector: attention is uniform, its query/key paths vanish, and
    the FFN has one ReLU mask, whose active count is a draw shared by all vectors): the relative
    variance matches `merge_relative_variance` for gradients spanning one direction and four,
    within 12%. A single Gaussian matrix in place of the branch's product through `width`
    units (width 0, nothing shared) is off by 25% or more."""
    d, length, batch, draws = 64, 4, 4, 2000
    apply, width, shared = _branch(kind, d)
    x = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(0), (1, 1, d)), (batch, length, d))
    keys = jax.random.split(jax.random.PRNGKey(1), draws)
    lam = beta = 0.5**0.5
    for directions in (1, 4):  # per sequence one gradient vector, the same for all its tokens
        v = jax.random.normal(jax.random.PRNGKey(2), (directions, d))
        g = jnp.broadcast_to(jnp.tile(v, (batch // directions, 1))[:, None, :], x.shape)
        branch = np.asarray(apply(keys, x, g))
        energy = np.sum((lam * np.asarray(g) + beta * branch) ** 2, axis=(1, 2, 3))
        measured = energy.var() / energy.mean() ** 2
        c = beta**2 * np.mean(np.sum(branch**2, axis=(1, 2, 3))) / (lam**2 * float(jnp.sum(g**2)))
        per_feature = np.asarray(g).reshape(batch * length, d)
        gram = per_feature @ per_feature.T
        inverse_pr = np.trace(gram @ gram) / np.trace(gram) ** 2
        predicted = merge_relative_variance(c, d, width, inverse_pr, shared)
        assert predicted == pytest.approx(measured, rel=0.12), (directions, c, predicted / measured)
        one_matrix = merge_relative_variance(c, d, 0, inverse_pr)
        assert abs(one_matrix / measured - 1) >= 0.25, (directions, one_matrix, measured)
