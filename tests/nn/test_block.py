"""The block's scheme hooks: norm scale, learned residual gate, identity norm; scan == unrolled
forward for every scheme."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepscale_jax.models.lm import DecoderLM
from deepscale_jax.nn.block import residual_sublayer, scaled
from deepscale_jax.nn.norms import Identity, make_norm
from deepscale_jax.schemes import build_scheme
from tests.helpers import TINY, init_params, tokens, unstack_model

NEEDS = {
    "deepnorm": {"norm_placement": "post"},
    "t_fixup": {"norm": "none"},
    "rezero": {"norm": "none"},
}


def test_identity_norm_has_no_parameters():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    norm = make_norm("none", 1e-5, jnp.float32, "n")
    variables = norm.init(jax.random.PRNGKey(1), x)
    assert isinstance(norm, Identity) and not variables
    np.testing.assert_array_equal(norm.apply(variables, x), x)


def test_scaled_norm_multiplies_its_output_and_skips_one():
    norm = lambda x: 2.0 * x
    assert scaled(norm, 1.0) is norm
    x = jnp.ones((2, 4), jnp.bfloat16)
    y = scaled(norm, jnp.float32(0.25))(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, 0.5)


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_residual_sublayer_coefficients(placement):
    x = jnp.arange(4.0)
    out = residual_sublayer(
        x, lambda h: h + 1.0, lambda h: 10.0 * h, lambda h: h, (0.5, 2.0), placement
    )
    want = (
        0.5 * x + 2.0 * (10.0 * x + 1.0) if placement == "pre" else 10.0 * (0.5 * x + 2 * (x + 1))
    )
    np.testing.assert_allclose(out, want)


@pytest.mark.parametrize("name", ["dslm", "deepnorm", "rezero", "lns"])
def test_scanned_and_unrolled_forward_agree_with_each_forward_hook(name):
    """residual (lambda, beta), the learned gate and the norm scale, traced under scan and
    concrete when unrolled, give the same logits (the params' equality is tests/schemes/)."""
    cfg = dataclasses.replace(TINY, **NEEDS.get(name, {}))
    toks = tokens()
    scanned = DecoderLM(cfg, build_scheme({"name": name}, cfg))
    flat_cfg = dataclasses.replace(cfg, scan_layers=False)
    unrolled = DecoderLM(flat_cfg, build_scheme({"name": name}, flat_cfg))
    p_scan = init_params(scanned, toks, seed=2)
    if name == "rezero":  # open the gates so that the branches matter
        p_scan["decoder"]["layers"]["resweight"] = jnp.array([0.3, -0.2, 0.5])
    p_unroll = unstack_model(p_scan, cfg.num_layers)
    got = jax.jit(scanned.apply)({"params": p_scan}, toks)
    want = jax.jit(unrolled.apply)({"params": p_unroll}, toks)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
