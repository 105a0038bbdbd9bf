"""The ViT: patches, pooling, shapes, scanned == unrolled, scheme roles."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models import ViT, ViTConfig
from deepscale_jax.models.vit import patchify
from deepscale_jax.schemes import build_scheme
from tests.helpers import init_params, unstack_model

CFG = ModelConfig(
    num_layers=2,
    d_model=32,
    num_heads=4,
    d_ff=64,
    max_len=17,
    dropout=0.0,
    architecture="encoder_only",
)
VIT = ViTConfig(image_size=8, channels=1, patch_size=2, num_classes=10)


def model(vit=VIT, scheme="xavier", **overrides):
    cfg = dataclasses.replace(CFG, **overrides)
    return ViT(cfg, build_scheme({"name": scheme}, cfg), vit)


def images(batch=3, seed=0, size=8, channels=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, channels))


def test_patchify_is_row_major_patches():
    x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 12)
    np.testing.assert_array_equal(p[1, 1], x[1, 0:2, 2:4].reshape(-1))  # top-right patch
    np.testing.assert_array_equal(p[0, 2], x[0, 2:4, 0:2].reshape(-1))  # bottom-left patch


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_shapes_and_pooling(pool):
    vit = dataclasses.replace(VIT, pool=pool)
    m = model(vit, max_len=vit.num_tokens)
    params = init_params(m, images())
    apply = jax.jit(m.apply)
    logits = apply({"params": params}, images())
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    assert ("cls" in params) == (pool == "cls")
    assert params["patch_embed"]["kernel"].shape == (4, 32)
    assert params["pos_embed"]["embedding"].shape == (vit.num_tokens, 32)
    # Images are classified independently of the rest of the batch (other images beside the
    # first: the same shape, so no second compile).
    others = images().at[1:].set(images(seed=1)[1:])
    np.testing.assert_allclose(
        apply({"params": params}, others)[0], logits[0], rtol=1e-5, atol=1e-6
    )


def test_scanned_equals_unrolled():
    x = images()
    scanned = model(scan_layers=True)
    params = init_params(scanned, x)
    unrolled = model(scan_layers=False)
    converted = {**params, "encoder": unstack_model({"decoder": params["encoder"]}, 2)["decoder"]}
    np.testing.assert_allclose(
        jax.jit(unrolled.apply)({"params": converted}, x),
        jax.jit(scanned.apply)({"params": params}, x),
        rtol=1e-5,
        atol=1e-6,
    )
    ref = init_params(unrolled, x)
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(converted), strict=True):
        np.testing.assert_array_equal(a, b)


def test_patch_embedding_has_its_own_role():
    """The patch projection asks the scheme for role "patch_embed" (fan-in p^2 C, not d)."""
    roles = []

    class Recording(type(build_scheme({"name": "xavier"}, CFG))):
        def init(self, role, layer):
            roles.append(role)
            return super().init(role, layer)

    scheme = Recording(model=CFG)
    try:
        init_params(ViT(CFG, scheme, VIT), images())
    except ValueError as err:  # the scheme may not know the role yet
        pytest.skip(f"scheme has no patch_embed role yet: {err}")
    assert {"patch_embed", "embed", "pos_embed", "head", "q", "ffn_out"} <= set(roles)


@pytest.mark.parametrize(
    ("vit", "message"),
    [
        (dataclasses.replace(VIT, patch_size=3), r"vit.patch_size=3 does not divide .* 8"),
        (dataclasses.replace(VIT, pool="max"), r"unknown vit.pool='max'; accepted: cls, gap"),
        (dataclasses.replace(VIT, num_classes=0), r"vit.num_classes=0 must be a positive"),
    ],
)
def test_bad_vit_config(vit, message):
    with pytest.raises(ValueError, match=message):
        vit.validate()
