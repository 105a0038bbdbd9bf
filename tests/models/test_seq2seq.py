"""Encoder-decoder model and decoding: cached == recomputed, MAtt incremental == parallel,
beam 1 == greedy, encoder padding is invisible."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepscale_jax import decode
from deepscale_jax.data.numbers import VOCAB
from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models.seq2seq import Seq2Seq, decode_params
from deepscale_jax.nn.attention import causal_average
from deepscale_jax.schemes import build_scheme

IDS = decode.SpecialIds.of(VOCAB)


def make_model(merged, scan=True, placement="post", scheme="xavier", **overrides):
    cfg = ModelConfig(
        vocab_size=259,
        num_layers=2,
        encoder_layers=1,
        d_model=32,
        num_heads=2,
        d_ff=64,
        max_len=16,
        architecture="encoder_decoder",
        position_embedding="sinusoidal",
        norm_placement=placement,
        scan_layers=scan,
        merged_attention=merged,
        **overrides,
    )
    model = Seq2Seq(cfg, build_scheme({"name": scheme}, cfg))
    rng = np.random.default_rng(0)
    src = jnp.asarray(rng.integers(0, 256, (3, 10)), jnp.int32)
    valid = jnp.asarray(np.arange(10)[None] < np.array([[10], [6], [3]]))
    src = jnp.where(valid, src, VOCAB.pad_id)
    tgt = jnp.asarray(rng.integers(0, 256, (3, 8)), jnp.int32).at[:, 0].set(VOCAB.bos_id)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), src, valid, tgt)["params"]
    return model, params, src, valid, tgt


@pytest.mark.parametrize(
    ("merged", "scan", "placement", "overrides"),
    [
        (True, False, "pre", {}),
        (False, True, "post", {}),
        (
            False,
            True,
            "pre",
            {
                "memory_tokens": 2,
                "memory_mode": "bottleneck",
                "persistent_memory": 2,
                "fused_qkv": True,
            },
        ),
    ],
)
def test_cached_incremental_decoding_equals_full_recompute_at_every_step(
    merged, scan, placement, overrides
):
    """KV cache (self + cross) and MAtt's running sum give the teacher-forced logits (also with
    the encoder's memory tokens, persistent memory slots in every self-attention and the fused
    QKV projection)."""
    model, params, src, valid, tgt = make_model(merged, scan, placement, **overrides)
    full = jax.jit(model.apply)({"params": params}, src, valid, tgt)
    start = jax.jit(lambda p, s, v: decode._start(model, p, s, v, 3, 8, VOCAB.bos_id)[1:])
    dmodel = decode.decoding_model(model)
    dparams, encoded, dvalid, cache = start(params, src, valid)
    step = jax.jit(decode._step, static_argnums=0)
    for t in range(tgt.shape[1]):
        log_probs, cache = step(dmodel, dparams, cache, tgt[:, t], t, encoded, dvalid)
        np.testing.assert_allclose(
            log_probs, jax.nn.log_softmax(full[:, t]), atol=2e-5, err_msg=f"step {t}"
        )


def test_matt_average_is_uniform_over_valid_prefix():
    v = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 1, 2)), jnp.float32)
    valid = jnp.asarray([[True, True, True, False]])
    out = causal_average(v, valid)
    for i in range(3):
        np.testing.assert_allclose(out[0, i], v[0, : i + 1].mean(axis=0), rtol=1e-6)


@pytest.mark.slow
def test_matt_has_no_self_attention_and_shares_value_projection():
    _, params, *_ = make_model(merged=True)
    layer = params["decoder"]["layers"]
    assert "attn" not in layer and "cross_attn" not in layer
    assert set(layer["merged_attn"]) == {"cross_q", "cross_k", "cross_v", "cross_out"}


def test_beam_search_with_beam_one_is_greedy():
    model, params, src, valid, _ = make_model(merged=True)
    greedy = jax.jit(decode.greedy_decode, static_argnums=(0, 4, 5))(
        model, params, src, valid, 8, IDS
    )
    beam_search = jax.jit(decode.beam_search, static_argnums=(0, 4, 5, 6))
    beam, _ = beam_search(model, params, src, valid, 8, IDS, 1)
    np.testing.assert_array_equal(beam, greedy)


@pytest.mark.slow
def test_greedy_decode_equals_argmax_of_full_recompute():
    model, params, src, valid, _ = make_model(merged=False)
    out = decode.greedy_decode(model, params, src, valid, 8, IDS)
    shifted = jnp.concatenate([jnp.full((3, 1), VOCAB.bos_id), out[:, :-1]], axis=1)
    logits = model.apply({"params": params}, src, valid, shifted)
    np.testing.assert_array_equal(out, jnp.argmax(logits, -1))  # no EOS in a random model


@pytest.mark.slow
def test_beam_four_scores_at_least_greedy():
    model, params, src, valid, _ = make_model(merged=False)
    _, beam_scores = decode.beam_search(model, params, src, valid, 8, IDS, beam_size=4)
    _, greedy_scores = decode.beam_search(model, params, src, valid, 8, IDS, beam_size=1)
    assert np.all(np.asarray(beam_scores) >= np.asarray(greedy_scores) - 1e-5)


@pytest.mark.parametrize("merged", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_encoder_padding_never_changes_non_pad_outputs(merged):
    model, params, src, valid, tgt = make_model(merged)
    other = jnp.where(valid, src, 7)  # different tokens under the pads
    longer = jnp.concatenate([other, jnp.full((3, 4), VOCAB.pad_id)], axis=1)
    longer_valid = jnp.concatenate([valid, jnp.zeros((3, 4), bool)], axis=1)
    encode = jax.jit(lambda p, s, v: model.apply({"params": p}, s, v, method=Seq2Seq.encode))
    enc, enc2 = encode(params, src, valid), encode(params, longer, longer_valid)
    mask = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(enc)[mask], np.asarray(enc2)[:, :10][mask], atol=1e-5)
    apply = jax.jit(model.apply)
    logits = apply({"params": params}, src, valid, tgt)
    logits2 = apply({"params": params}, longer, longer_valid, tgt)
    np.testing.assert_allclose(logits, logits2, atol=1e-5)


@pytest.mark.slow
def test_decode_params_unrolls_only_the_decoder():
    model, params, *_ = make_model(merged=False)
    unrolled = decode_params(params, model.config)
    assert set(unrolled["decoder"]) == {"layer_000", "layer_001"}
    assert "layers" in unrolled["encoder"]
