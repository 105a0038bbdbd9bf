"""The decoder LM: causality, padding, tied/untied heads, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import init_params, tiny_lm, tokens


@pytest.mark.parametrize("placement", ["pre", "post"])
@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_changing_token_t_never_changes_logits_before_t(placement, position):
    model = tiny_lm(norm_placement=placement, position_embedding=position)
    toks = tokens(batch=1)
    params = init_params(model, toks)
    apply = jax.jit(model.apply)
    base = apply({"params": params}, toks)
    for t in (0, 5, 15):
        changed = toks.at[0, t].set((toks[0, t] + 7) % 64)
        out = apply({"params": params}, changed)
        np.testing.assert_array_equal(out[0, :t], base[0, :t])
        assert not np.allclose(out[0, t], base[0, t])


def test_padding_masks_keys():
    """Pad positions never influence valid ones: change a pad token, valid logits stay."""
    model = tiny_lm()
    toks = tokens(batch=2)
    valid = jnp.ones_like(toks, bool).at[1, 10:].set(False)
    params = init_params(model, toks)
    apply = jax.jit(model.apply)
    base = apply({"params": params}, toks, valid)
    # causal already hides later tokens; pad an *earlier* slot to exercise the padding mask.
    valid_early = jnp.ones_like(toks, bool).at[1, 2].set(False)
    a = apply({"params": params}, toks, valid_early)
    b = apply({"params": params}, toks.at[1, 2].set(63 - toks[1, 2]), valid_early)
    np.testing.assert_allclose(a[1, 3:], b[1, 3:], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(a[0], base[0], rtol=1e-6, atol=1e-6)


def test_untied_head_has_its_own_weight():
    model = tiny_lm(tie_embeddings=False)
    toks = tokens()
    params = init_params(model, toks)
    assert params["head"]["kernel"].shape == (32, 64)
    assert model.apply({"params": params}, toks).shape == (2, 16, 64)


def test_dropout_is_stochastic_in_training_only():
    model = tiny_lm(dropout=0.1, attn_dropout=0.1)
    toks = tokens()
    params = init_params(model, toks)
    det1 = jax.jit(lambda p: model.apply({"params": p}, toks))(params)
    det2 = jax.jit(lambda p: model.apply({"params": p}, toks, deterministic=True))(params)
    np.testing.assert_array_equal(det1, det2)
    train_apply = jax.jit(
        lambda k: model.apply({"params": params}, toks, deterministic=False, rngs={"dropout": k})
    )
    train = lambda k: train_apply(jax.random.PRNGKey(k))
    assert not np.allclose(train(0), train(1))
    np.testing.assert_array_equal(train(2), train(2))


def test_sequence_longer_than_position_table_is_rejected():
    model = tiny_lm()
    params = init_params(model, tokens())
    with pytest.raises(ValueError, match="model.max_len=16"):
        model.apply({"params": params}, tokens(length=17))
