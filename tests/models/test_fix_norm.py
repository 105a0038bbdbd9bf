"""FixNorm (Nguyen & Salazar 2019; nn/embed.py `TokenEmbed(fix_norm=True)`) in the LM and the
seq2seq model, and every registered norm in every model with Pre-LN and Post-LN placement."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models import EncoderMLM, ViT, ViTConfig
from deepscale_jax.models.lm import DecoderLM
from deepscale_jax.models.seq2seq import Seq2Seq, Seq2SeqConfig
from deepscale_jax.nn.embed import TokenEmbed
from deepscale_jax.nn.initializers import normal
from deepscale_jax.nn.norms import NORMS
from deepscale_jax.schemes import build_scheme

D = 32
# Unrolled layers, run eagerly: after the first model each op is cached, so eager init + apply
# costs far less than compiling every configuration (this file runs dozens of them).
LM = ModelConfig(
    vocab_size=64,
    num_layers=2,
    d_model=D,
    num_heads=4,
    d_ff=64,
    max_len=16,
    dropout=0.0,
    scan_layers=False,
)
TOKENS = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 64)


def _unit(w):
    return w / jnp.linalg.norm(w, axis=-1, keepdims=True)


def test_token_embed_fix_norm_rows_and_tied_logits():
    embed = TokenEmbed(64, D, normal(0.3), fix_norm=True)
    params = nn.meta.unbox(embed.init(jax.random.PRNGKey(1), TOKENS))
    w = params["params"]["embedding"]
    x = embed.apply(params, TOKENS)
    np.testing.assert_allclose(jnp.linalg.norm(x, axis=-1), math.sqrt(D), rtol=1e-5)
    np.testing.assert_allclose(x, math.sqrt(D) * _unit(w)[TOKENS], rtol=1e-5)
    h = jax.random.normal(jax.random.PRNGKey(2), (2, 8, D))
    logits = embed.apply(params, h, method="attend")
    np.testing.assert_allclose(logits, h @ _unit(w).T, rtol=1e-5, atol=1e-5)
    # Without fix_norm: the raw table, both ways.
    plain = TokenEmbed(64, D, normal(0.3))
    np.testing.assert_allclose(plain.apply(params, TOKENS), w[TOKENS])
    np.testing.assert_allclose(plain.apply(params, h, method="attend"), h @ w.T, rtol=1e-5)


def test_token_embed_fix_norm_zero_row_has_finite_gradients():
    embed = TokenEmbed(4, D, normal(0.3), fix_norm=True)
    params = {"params": {"embedding": jnp.zeros((4, D)).at[1:].set(1.0)}}
    toks = jnp.arange(4)[None]

    def loss(p):
        return jnp.sum(embed.apply(p, toks) ** 2) + jnp.sum(
            embed.apply(p, jnp.ones((1, D)), method="attend")
        )

    grads = jax.grad(loss)(params)
    assert np.all(np.isfinite(grads["params"]["embedding"]))


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_lm_with_fix_norm(placement):
    """Embedded tokens (no positions) have norm sqrt(d); logits = h w_hat^T for the final h."""
    cfg = dataclasses.replace(
        LM, fix_norm=True, position_embedding="none", norm="scale_norm", norm_placement=placement
    )
    model = DecoderLM(cfg, build_scheme({"name": "xavier"}, cfg))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(3), TOKENS))["params"]
    logits, state = model.apply({"params": params}, TOKENS, capture_intermediates=True)
    inter = state["intermediates"]
    embedded = inter["embed_out"][0]  # the sown stack input: E[tokens] (no positions, no dropout)
    np.testing.assert_allclose(jnp.linalg.norm(embedded, axis=-1), math.sqrt(D), rtol=1e-5)
    w_hat = _unit(params["embed"]["embedding"])
    np.testing.assert_allclose(embedded, math.sqrt(D) * w_hat[TOKENS], rtol=1e-5, atol=1e-6)
    # The final hidden state: the final norm's output (Pre-LN) or the last layer's (Post-LN).
    if placement == "pre":
        h = inter["final_norm"]["__call__"][0]
    else:
        h = inter["decoder"]["__call__"][0]
    np.testing.assert_allclose(logits, h @ w_hat.T, rtol=1e-4, atol=1e-5)
    assert "head" not in params  # tied: the one table in and out


def test_seq2seq_fix_norm_scales_the_embedding_once():
    """With fix_norm, `scale_embeddings` adds no second sqrt(d): inputs have norm sqrt(d) either
    way, and the tied logits are h w_hat^T."""
    cfg = dataclasses.replace(
        LM, architecture="encoder_decoder", encoder_layers=1, position_embedding="none"
    )
    cfg = dataclasses.replace(cfg, fix_norm=True)
    scheme = build_scheme({"name": "xavier"}, cfg)
    valid = jnp.ones(TOKENS.shape, bool)
    model = Seq2Seq(cfg, scheme)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(4), TOKENS, valid, TOKENS))
    for scale in (False, True):
        scaled = Seq2Seq(cfg, scheme, Seq2SeqConfig(scale_embeddings=scale))
        x = scaled.apply(params, TOKENS, method=lambda m, t: m._embed(t))
        np.testing.assert_allclose(jnp.linalg.norm(x, axis=-1), math.sqrt(D), rtol=1e-5)
    logits, state = model.apply(params, TOKENS, valid, TOKENS, capture_intermediates=True)
    h = state["intermediates"]["decoder_norm"]["__call__"][0]
    w_hat = _unit(params["params"]["embed"]["embedding"])
    np.testing.assert_allclose(logits, h @ w_hat.T, rtol=1e-4, atol=1e-5)


# --------------------------------------------- every norm, every model, both placements

IMAGES = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 1))
VIT = ViTConfig(image_size=8, channels=1, patch_size=4, num_classes=10)


def _build(kind: str, cfg: ModelConfig):
    """(model, init/apply args) of a tiny `kind` model."""
    if kind == "lm":
        return DecoderLM(cfg, build_scheme({"name": "xavier"}, cfg)), (TOKENS,)
    cfg = dataclasses.replace(
        cfg,
        architecture="encoder_decoder" if kind == "seq2seq" else "encoder_only",
        encoder_layers=1 if kind == "seq2seq" else 0,
    )
    scheme = build_scheme({"name": "xavier"}, cfg)
    if kind == "mlm":
        return EncoderMLM(cfg, scheme), (TOKENS, jnp.ones(TOKENS.shape, bool))
    if kind == "vit":
        return ViT(cfg, scheme, VIT), (IMAGES,)
    return Seq2Seq(cfg, scheme), (TOKENS, jnp.ones(TOKENS.shape, bool), TOKENS)


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize(
    "kind",
    [
        "lm",
        "seq2seq",
        pytest.param("mlm", marks=pytest.mark.slow),
        pytest.param("vit", marks=pytest.mark.slow),
    ],
)
def test_every_norm_builds_and_runs_in_every_model(kind, norm, placement):
    """(The MLM and ViT share the LM's stack and trunk; they run in the slow suite.)"""
    cfg = dataclasses.replace(LM, norm=norm, norm_placement=placement)
    model, args = _build(kind, cfg)
    variables = model.init(jax.random.PRNGKey(6), *args)
    out = model.apply(variables, *args)
    assert np.all(np.isfinite(out))
    norm_params = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(variables))
        if "norm" in jax.tree_util.keystr(path)
    ]
    if norm == "none":
        assert not norm_params
    elif norm == "scale_norm":
        assert norm_params and all(leaf.shape == () for leaf in norm_params)
