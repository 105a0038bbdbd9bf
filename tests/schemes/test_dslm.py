"""DeepScaleLM: theory.md 2.2's table, the FFN rule per activation, residual, embeddings, head,
r0 from data, and the measured stds of the real LM."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models.lm import DecoderLM
from deepscale_jax.schemes import build_scheme
from deepscale_jax.schemes.dslm import data_r0, ffn_std, same_token_probability
from tests.helpers import init_params, tokens
from tests.schemes.stds import DEPTH_CASES, check_scheme_stds

# theory.md sec. 2.2: (d, p, N, lambda^2, scaled) -> sigma_vo at layer 0 / N/2 / last,
# r at layer 0 / N/2 / N. k = 0.005 * 2N reproduces the authors' beta^2 = 0.005.
TABLE = [
    (1024, 0.1, 192, True, (0.0456, 0.0361, 0.0338), (0.199, 0.504, 0.660)),
    (1024, 0.1, 192, False, (0.0456, 0.0320, 0.0319), (0.199, 0.818, 0.824)),
    (1024, 0.0, 192, True, (0.0456, 0.0360, 0.0335), (0.221, 0.570, 0.756)),
    (768, 0.1, 12, False, (0.0526, 0.0380, 0.0376), (0.199, 0.735, 0.770)),
]


def paper_model(d: int, p: float, n: int, **overrides) -> ModelConfig:
    return ModelConfig(
        d_model=d, num_heads=16, d_ff=4 * d, dropout=p, num_layers=n, max_len=512, **overrides
    )


@pytest.mark.parametrize(("d", "p", "n", "scaled", "sigmas", "rs"), TABLE)
def test_correlation_recursion_reproduces_theory_table(d, p, n, scaled, sigmas, rs):
    cfg = paper_model(d, p, n)
    scheme = build_scheme({"name": "dslm", "k": 0.005 * 2 * n, "scale_residual": scaled}, cfg)
    if scaled:
        assert scheme.beta2 == pytest.approx(0.005) and scheme.lam2 == pytest.approx(0.995)
    vo, r = scheme.vo_table(), scheme.correlation_table()
    assert [round(float(vo[i]), 4) for i in (0, n // 2, n - 1)] == list(sigmas)
    assert [round(float(r[i]), 3) for i in (0, n // 2, n)] == list(rs)
    assert float(scheme.std("v", n // 2)) == pytest.approx(vo[n // 2], rel=1e-6)
    assert float(scheme.std("attn_out", jnp.int32(n - 1))) == pytest.approx(vo[-1], rel=1e-6)


def test_theory_table_2_1_constants():
    scheme = build_scheme({"name": "dslm"}, paper_model(1024, 0.1, 192))
    assert scheme.std("q", 0) == pytest.approx(0.0312, abs=1e-4)
    assert scheme.std("ffn_in", 5) == pytest.approx(0.0256, abs=1e-4)
    assert scheme.std("ffn_out", 5) == scheme.std("ffn_in", 5)
    assert scheme.std("head", None) == pytest.approx(0.0312, abs=1e-4)


@pytest.mark.parametrize(("d", "d_ff"), [(1024, 4096), (128, 512), (64, 96), (256, 1536)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.3])
def test_relu_ffn_std_is_the_general_formula_and_the_authors_at_4d(d, d_ff, p):
    """sigma^4 = 2 (1-p)/(d d_ff), i.e. d_ff d sigma^4/2/(1-p) = 1; = sqrt((1-p)/2)/d at 4d."""
    sigma = ffn_std("relu", d, d_ff, p)
    assert sigma**4 == pytest.approx(2 * (1 - p) / (d * d_ff), rel=1e-9)
    if d_ff == 4 * d:
        assert sigma == pytest.approx(math.sqrt(math.sqrt((1 - p) / 2) / d), rel=1e-9)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_ffn_gain_is_one_for_the_configured_activation(activation):
    """Monte Carlo through the real activation: unit-variance in, unit second moment out.

    Averaged over 8 weight draws: the activation's mean times a column sum of W2 is a per-feature
    offset shared by all tokens, which makes a single draw fluctuate by ~4%."""
    d, d_ff, draws = 128, 384, 8
    sigma = ffn_std(activation, d, d_ff, 0.0)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k1, (draws, 512, d))
    w1 = sigma * jax.random.normal(k2, (draws, d, d_ff))
    w2 = sigma * jax.random.normal(k3, (draws, d_ff, d))
    act = jax.nn.relu if activation == "relu" else lambda h: jax.nn.gelu(h, approximate=False)
    out = jnp.einsum("nth,nhd->ntd", act(jnp.einsum("ntd,ndh->nth", x, w1)), w2)
    assert float(jnp.mean(out**2)) == pytest.approx(1.0, rel=0.05)
    if activation == "gelu":  # GeLU ~ x/2 near 0: a larger std than ReLU's
        assert sigma > ffn_std("relu", d, d_ff, 0.0)


def test_residual_k_over_merges_and_unit_sum():
    cfg = paper_model(1024, 0.1, 192)
    scheme = build_scheme({"name": "dslm"}, cfg)
    lam, beta = scheme.residual(7)
    assert beta**2 == pytest.approx(2 / 384) and lam**2 + beta**2 == pytest.approx(1.0)
    lam, beta = build_scheme({"name": "dslm", "k": 4.0}, cfg).residual(0)
    assert beta**2 == pytest.approx(4 / 384)
    assert build_scheme({"name": "dslm", "scale_residual": False}, cfg).residual(3) == (1.0, 1.0)


def test_embeddings_sum_to_one_minus_p_and_tied_logits_are_scaled():
    cfg = paper_model(256, 0.1, 4)
    learned = build_scheme({"name": "dslm"}, cfg)
    assert learned.std("embed", None) == pytest.approx(math.sqrt(0.9 / 2))
    assert learned.std("pos_embed", None) == learned.std("embed", None)
    sinus = build_scheme(
        {"name": "dslm"}, dataclasses.replace(cfg, position_embedding="sinusoidal")
    )
    assert sinus.std("embed", None) == pytest.approx(math.sqrt(0.9))
    assert learned.logit_scale() == pytest.approx(1 / math.sqrt(256 * 0.45))
    untied = build_scheme({"name": "dslm"}, dataclasses.replace(cfg, tie_embeddings=False))
    assert untied.logit_scale() == 1.0


def test_tied_lm_logits_have_unit_variance_at_init():
    cfg = ModelConfig(
        vocab_size=256, num_layers=2, d_model=128, num_heads=4, d_ff=512, max_len=64, dropout=0.1
    )
    model = DecoderLM(cfg, build_scheme({"name": "dslm"}, cfg))
    toks = tokens(batch=4, length=64, vocab=256)
    logits = jax.jit(model.apply)({"params": init_params(model, toks)}, toks)
    assert float(jnp.var(logits)) == pytest.approx(1.0, rel=0.1)


def test_same_token_probability_and_data_r0():
    assert same_token_probability(np.array([[0, 0, 1, 1]])) == pytest.approx(4 / 12)
    assert same_token_probability(np.array([[0, 1, 2, 3], [5, 5, 5, 5]])) == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    iid = rng.integers(0, 50, size=(64, 256))  # i.i.d. uniform: sum_t f_t^2 = 1/50
    assert same_token_probability(iid) == pytest.approx(1 / 50, rel=0.05)
    cfg = paper_model(128, 0.1, 4)
    assert data_r0(iid, cfg) == pytest.approx(same_token_probability(iid) / 2)  # + positions
    no_pos = dataclasses.replace(cfg, position_embedding="none")
    assert data_r0(iid, no_pos) == pytest.approx(same_token_probability(iid))


def test_r0_from_data_needs_a_token_sample():
    cfg = paper_model(128, 0.1, 4)
    scheme = build_scheme({"name": "dslm", "r0_from_data": True}, cfg)
    with pytest.raises(ValueError, match="r0_from_data=True needs the training data"):
        scheme.std("v", 0)
    sample = np.tile(np.arange(8), (2, 4))  # every token 4 times in 32: P(same) = 3/31
    resolved = scheme.with_token_sample(sample)
    assert resolved.r0 == pytest.approx(3 / 31 / 2) and not resolved.r0_from_data
    assert resolved.correlation_table()[0] == pytest.approx(0.9 * 3 / 31 / 2)
    plain = build_scheme({"name": "dslm"}, cfg)
    assert plain.with_token_sample(sample) is plain


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"k": 0.0}, r"scheme.k=0.0 must lie in \(0, 8\]"),
        ({"k": 9.0}, r"scheme.k=9.0 must lie in \(0, 8\]"),
        ({"r0": 1.5}, r"scheme.r0=1.5 must lie in \(0, 1\]"),
        ({"mode": "zero_code"}, r"scheme 'dslm' takes no option\(s\) scheme.mode; accepted: k, r0"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        build_scheme({"name": "dslm", **options}, paper_model(128, 0.1, 4))


def expected_std(role, layer, cfg):
    scheme = build_scheme({"name": "dslm"}, cfg)  # the vo table is checked against theory.md above
    d, p = cfg.d_model, cfg.dropout
    if role in ("embed", "pos_embed"):
        return math.sqrt((1 - p) / 2)
    if role in ("q", "k", "head"):
        return math.sqrt(1 / d)
    if role in ("ffn_in", "ffn_out"):
        return (2 * (1 - p) / (d * cfg.d_ff)) ** 0.25
    return float(scheme.vo_table()[layer])


@pytest.mark.parametrize(("depth", "unrolled"), DEPTH_CASES)
def test_measured_stds(depth, unrolled):
    check_scheme_stds("dslm", expected_std, depth, unrolled)


def test_measured_stds_post_ln_gelu():
    check_scheme_stds("dslm", expected_gelu_std, 4, False, norm_placement="post", activation="gelu")


def expected_gelu_std(role, layer, cfg):
    if role in ("ffn_in", "ffn_out"):
        return ffn_std("gelu", cfg.d_model, cfg.d_ff, cfg.dropout)
    return expected_std(role, layer, cfg)
