"""Memory tokens (MemTransformer, MemBottleneck) and the FFN-free layer: causality, padding,
the bottleneck's information path, parameters."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models.lm import DecoderLM
from deepscale_jax.models.memory import memory_mask
from deepscale_jax.models.mlm import EncoderMLM
from deepscale_jax.nn.block import BottleneckLayer, DecoderLayer
from deepscale_jax.schemes import build_scheme
from tests.helpers import TINY, tokens

ENCODER = dataclasses.replace(TINY, architecture="encoder_only", num_layers=2)


def build(cls, cfg):
    return cls(cfg, build_scheme({"name": "xavier"}, cfg))


def params_of(model, *args):
    return nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), *args))["params"]


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_lm_with_memory_tokens_stays_causal(placement):
    cfg = dataclasses.replace(TINY, memory_tokens=3, norm_placement=placement)
    model = build(DecoderLM, cfg)
    toks = tokens(2, 12)
    params = params_of(model, toks)
    assert params["memory"]["embedding"].shape == (3, cfg.d_model)
    apply = jax.jit(model.apply)
    logits = apply({"params": params}, toks)
    changed = apply({"params": params}, toks.at[:, 8].set((toks[:, 8] + 1) % cfg.vocab_size))
    assert logits.shape == (2, 12, cfg.vocab_size)
    np.testing.assert_allclose(logits[:, :8], changed[:, :8], atol=1e-6)
    assert not np.allclose(logits[:, 8:], changed[:, 8:], atol=1e-4)


def test_causal_memory_rows_read_memory_only_and_sequence_rows_read_all_memory():
    cfg = dataclasses.replace(TINY, memory_tokens=2)
    mask = np.asarray(memory_mask(None, 1, 3, cfg, causal=True))[0, 0]
    expected = np.array(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        bool,
    )
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("mode", ["prepend", "bottleneck"])
def test_mlm_with_memory_ignores_padding(mode):
    cfg = dataclasses.replace(ENCODER, memory_tokens=2, memory_mode=mode)
    model = build(EncoderMLM, cfg)
    toks = tokens(2, 10)
    valid = jnp.arange(10)[None] < jnp.array([[10], [6]])
    params = params_of(model, toks, valid)
    apply = jax.jit(model.apply)
    logits = apply({"params": params}, toks, valid)
    other = apply({"params": params}, jnp.where(valid, toks, 5), valid)
    np.testing.assert_allclose(logits[1, :6], other[1, :6], atol=1e-5)
    assert logits.shape == (2, 10, cfg.vocab_size)


def test_bottleneck_sequence_rows_read_only_the_updated_memory():
    """H^seq_{l+1}[i] is the "sequence" read layer applied to row i alone with the updated
    memory as context: sequence rows never read one another."""
    cfg = dataclasses.replace(ENCODER, memory_tokens=2, memory_mode="bottleneck")
    scheme = build_scheme({"name": "xavier"}, cfg)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 2 + 5, cfg.d_model))
    key = jax.random.PRNGKey(2)
    layer = BottleneckLayer(cfg, scheme)
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), x, 0, key, None))["params"]
    out, _ = layer.apply({"params": params}, x, 0, key, None)
    read = DecoderLayer(cfg, scheme, kind="read")
    memory, _ = read.apply({"params": params["memory"]}, x[:, :2], 0, key, None, x, None)
    np.testing.assert_allclose(out[:, :2], memory, atol=1e-6)
    for i in range(5):
        row, _ = read.apply(
            {"params": params["sequence"]}, x[:, 2 + i : 3 + i], 0, key, None, memory, None
        )
        np.testing.assert_allclose(out[:, 2 + i : 3 + i], row, atol=1e-5)


def test_bottleneck_needs_a_bidirectional_stack():
    cfg = dataclasses.replace(TINY, memory_tokens=2, memory_mode="bottleneck")
    with pytest.raises(ValueError, match="memory_mode='bottleneck' needs a bidirectional"):
        memory_mask(None, 1, 4, cfg, causal=True)


def test_all_attention_layer_has_no_ffn_and_one_merge_per_layer():
    cfg = dataclasses.replace(TINY, use_ffn=False, persistent_memory=4)
    model = build(DecoderLM, cfg)
    params = params_of(model, tokens(1, 8))
    layer = params["decoder"]["layers"]
    assert "ffn" not in layer and "ffn_norm" not in layer
    assert cfg.residual_merges("decoder") == cfg.num_layers


def test_bad_memory_config_names_the_field():
    with pytest.raises(ValueError, match="model.memory_tokens=-1 must be an integer >= 0"):
        ModelConfig(memory_tokens=-1).validate()
    with pytest.raises(ValueError, match="set model.memory_tokens > 0"):
        ModelConfig(memory_mode="bottleneck").validate()
    with pytest.raises(ValueError, match="unknown model.memory_mode='ctrl'"):
        ModelConfig(memory_tokens=2, memory_mode="ctrl").validate()
