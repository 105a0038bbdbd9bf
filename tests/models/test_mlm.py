"""The MLM encoder: bidirectional, padding-invariant, tied output, scheme roles."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models import EncoderMLM
from deepscale_jax.schemes import build_scheme
from tests.helpers import init_params

CFG = ModelConfig(
    vocab_size=258,
    num_layers=2,
    d_model=32,
    num_heads=4,
    d_ff=64,
    max_len=16,
    dropout=0.0,
    architecture="encoder_only",
)


def model(scheme="xavier", **overrides):
    cfg = dataclasses.replace(CFG, **overrides)
    return EncoderMLM(cfg, build_scheme({"name": scheme}, cfg))


def toks(batch=2, length=16, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, 256)


def test_attention_is_bidirectional():
    m = model()
    x = toks(batch=1)
    params = init_params(m, x)
    base = m.apply({"params": params}, x)
    changed = m.apply({"params": params}, x.at[0, 15].set((x[0, 15] + 1) % 256))
    assert base.shape == (1, 16, 258)
    assert not np.allclose(changed[0, 0], base[0, 0])  # the first token sees the last


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("placement", ["pre", "post"])
def test_padding_never_changes_non_pad_outputs(scan, placement):
    m = model(scan_layers=scan, norm_placement=placement)
    x = toks()
    params = init_params(m, x)
    apply = jax.jit(lambda t, v: m.apply({"params": params}, t, v))
    lengths = jnp.array([11, 16])
    valid = jnp.arange(16)[None, :] < lengths[:, None]
    padded = apply(x, valid)
    # Other pad tokens (including [MASK]) leave every valid position unchanged ...
    other = jnp.where(valid, x, jnp.array([[257], [256]]))
    np.testing.assert_allclose(apply(other, valid)[0, :11], padded[0, :11], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apply(other, valid)[1], padded[1], rtol=1e-5, atol=1e-5)
    # ... and so does dropping the pads: the unpadded sequence gives the same outputs.
    short = m.apply({"params": params}, x[:1, :11], jnp.ones((1, 11), bool))
    np.testing.assert_allclose(short[0], padded[0, :11], rtol=1e-5, atol=1e-5)


def test_tied_and_untied_heads():
    x = toks()
    tied = init_params(model(), x)
    assert "head" not in tied and tied["embed"]["embedding"].shape == (258, 32)
    untied = init_params(model(tie_embeddings=False), x)
    assert untied["head"]["kernel"].shape == (32, 258)


def test_every_weight_comes_from_the_scheme():
    """With the default scheme (std 0.02, out-projections / sqrt(2N)) every matrix has the
    scheme's std, so no Flax default initializer slipped in."""
    m = model("default", d_model=64, d_ff=128, num_layers=2, tie_embeddings=False)
    params = init_params(m, toks())
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for name, value in flat.items():
        if name.endswith("['kernel']") or name.endswith("['embedding']"):
            want = 0.02 / 2 if ("attn_out" in name or "ffn_out" in name) else 0.02
            assert abs(float(jnp.std(value)) - want) < 0.2 * want, name
