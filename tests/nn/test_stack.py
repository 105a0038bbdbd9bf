"""Scanned == unrolled, remat == no remat."""

import re

import jax
import numpy as np
import pytest

from deepscale_jax.nn.stack import stack_layers, unstack_layers
from tests.helpers import init_params, tiny_lm, tokens, unstack_model


@pytest.mark.parametrize(
    ("scheme", "placement"),
    [
        ("xavier", "pre"),
        ("default", "post"),
        pytest.param("xavier", "post", marks=pytest.mark.slow),
        pytest.param("default", "pre", marks=pytest.mark.slow),
    ],
)
def test_scanned_and_unrolled_give_identical_parameters_and_logits(scheme, placement):
    toks = tokens()
    scanned = tiny_lm(scheme, scan_layers=True, norm_placement=placement)
    unrolled = tiny_lm(scheme, scan_layers=False, norm_placement=placement)
    p_scan = init_params(scanned, toks, seed=3)
    p_unroll = init_params(unrolled, toks, seed=3)

    converted = unstack_model(p_scan, scanned.config.num_layers)
    assert jax.tree.structure(converted) == jax.tree.structure(p_unroll)
    for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(p_unroll), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    logits_scan = jax.jit(scanned.apply)({"params": p_scan}, toks)
    logits_unroll = jax.jit(unrolled.apply)({"params": p_unroll}, toks)
    np.testing.assert_allclose(logits_scan, logits_unroll, rtol=1e-5, atol=1e-5)


def test_layers_get_different_weights_and_seeds_differ():
    toks = tokens()
    model = tiny_lm()
    q = init_params(model, toks, seed=0)["decoder"]["layers"]["attn"]["q"]["kernel"]
    assert not np.allclose(q[0], q[1])
    q_other = init_params(model, toks, seed=1)["decoder"]["layers"]["attn"]["q"]["kernel"]
    assert not np.allclose(q, q_other)


def test_deeper_model_shares_lower_layers():
    """A weight is a function of (seed, layer, role): depth 5 extends depth 3."""
    toks = tokens()
    shallow = init_params(tiny_lm(num_layers=3), toks)["decoder"]["layers"]
    deep = init_params(tiny_lm(num_layers=5), toks)["decoder"]["layers"]
    np.testing.assert_array_equal(
        shallow["ffn"]["ffn_in"]["kernel"], deep["ffn"]["ffn_in"]["kernel"][:3]
    )


@pytest.mark.parametrize(
    ("policy", "scan"),
    [
        ("full", True),
        ("dots", True),
        ("sublayer_outputs", True),
        ("full", False),
        # The rest of the grid (same code paths) in the slow run.
        pytest.param("dots_no_batch", True, marks=pytest.mark.slow),
        pytest.param("dots", False, marks=pytest.mark.slow),
        pytest.param("dots_no_batch", False, marks=pytest.mark.slow),
        pytest.param("sublayer_outputs", False, marks=pytest.mark.slow),
    ],
)
def test_remat_gives_the_same_gradients(policy, scan):
    toks = tokens()
    plain = tiny_lm(scan_layers=scan)
    remat = tiny_lm(scan_layers=scan, remat_policy=policy)
    params = init_params(plain, toks)

    def loss(model, p):
        return jax.numpy.mean(model.apply({"params": p}, toks) ** 2)

    g_plain = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
    g_remat = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
    for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_layout_converters_round_trip():
    params = init_params(tiny_lm(), tokens())["decoder"]
    unrolled = unstack_layers(params, 3)
    assert sorted(unrolled) == ["layer_000", "layer_001", "layer_002"]
    back = stack_layers(unrolled)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)


def while_bodies(hlo: str) -> list[str]:
    """The text of every while-loop body computation in an optimized HLO module."""
    names = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    bodies = []
    for block in hlo.split("\n\n"):
        header = block.lstrip().split(" ", 1)[0].lstrip("%")
        if header in names:
            bodies.append(block)
    return bodies


def test_scan_adds_no_per_layer_copies_or_rng_to_the_gradient():
    """Guards "scan costs nothing" (benchmarks/README.md, Scan vs unrolled): in the compiled
    forward + backward of a scanned stack, the per-layer residuals and the stacked weight
    gradients are written in place (no copy of an (N, ...) buffer inside a loop body), and
    nothing random runs at dropout 0 even with a dropout rng and deterministic=False."""
    num_layers = 5  # a leading dim no other array of this model has
    toks = tokens()
    model = tiny_lm(num_layers=num_layers)
    params = init_params(model, toks)
    rngs = {"dropout": jax.random.PRNGKey(1)}

    def loss(p):
        return jax.numpy.mean(model.apply({"params": p}, toks, deterministic=False, rngs=rngs))

    hlo = jax.jit(jax.value_and_grad(loss)).lower(params).compile().as_text()
    bodies = while_bodies(hlo)
    assert len(bodies) >= 2  # the forward and the backward scan
    stacked_copy = re.compile(rf"= \w+\[{num_layers},[\d,]*\]\S* copy\(")
    for body in bodies:
        assert not stacked_copy.search(body), stacked_copy.search(body).group(0)
    assert not re.search(r" (rng|rng-bit-generator|rng-get-and-update-state)\(|threefry", hlo)
