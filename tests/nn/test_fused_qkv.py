"""The fused QKV projection (`model.fused_qkv`) is the separate Q, K, V projections in one
kernel: the same initial numbers per role, the same logits and the same gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from deepscale_jax import sharding
from deepscale_jax.nn.attention import FUSED_QKV
from tests.helpers import init_params, tiny_lm, tokens

ROLES = ("q", "k", "v")


def _attention_subtrees(params: dict, scan: bool, depth: int) -> list[dict]:
    decoder = params["decoder"]
    if scan:
        return [decoder["layers"]["attn"]]
    return [decoder[f"layer_{i:03d}"]["attn"] for i in range(depth)]


def fuse(params: dict, scan: bool, depth: int) -> dict:
    """The unfused model's params with q, k, v of every self-attention stacked into `qkv`
    (axis -3 of the kernel, (d, 3, H, D) per layer; -3 of the bias)."""
    params = jax.tree.map(lambda x: x, params)  # a copy of the dict structure
    for attn in _attention_subtrees(params, scan, depth):
        parts = [attn.pop(role) for role in ROLES]
        attn[FUSED_QKV] = {
            name: jnp.stack([p[name] for p in parts], axis=-3) for name in ("kernel", "bias")
        }
    return params


@pytest.mark.parametrize(
    ("scheme", "scan", "placement"),
    [
        ("ds_init", True, "post"),  # layer-dependent stds, traced under scan
        pytest.param("dslm", True, "pre", marks=pytest.mark.slow),
        pytest.param("xavier", False, "post", marks=pytest.mark.slow),
    ],
)
def test_fused_model_starts_from_the_separate_projections_and_computes_the_same(
    scheme, scan, placement
):
    toks = tokens()
    depth = 3
    separate = tiny_lm(scheme, scan_layers=scan, norm_placement=placement)
    fused = tiny_lm(scheme, scan_layers=scan, norm_placement=placement, fused_qkv=True)
    p_sep = init_params(separate, toks, seed=5)
    p_fused = init_params(fused, toks, seed=5)

    # Bit-identical initial numbers: each slice is drawn as its role (layer-dependent stds too).
    want = fuse(p_sep, scan, depth)
    assert jax.tree.structure(want) == jax.tree.structure(p_fused)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(p_fused), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Same function of the same numbers, after moving them off init.
    noisy = jax.tree.map(
        lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(7), x.shape), p_sep
    )

    # Same logits and same gradients (slice by slice), from one compiled forward + backward
    # per model.
    def loss(model, params):
        logits = model.apply({"params": params}, toks)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    g_sep, logits_sep = jax.jit(jax.grad(lambda p: loss(separate, p), has_aux=True))(noisy)
    g_fused, logits_fused = jax.jit(jax.grad(lambda p: loss(fused, p), has_aux=True))(
        fuse(noisy, scan, depth)
    )
    np.testing.assert_allclose(logits_fused, logits_sep, rtol=2e-5, atol=2e-5)
    for a, b in zip(
        jax.tree.leaves(fuse(g_sep, scan, depth)), jax.tree.leaves(g_fused), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fused_kernel_is_sharded_like_the_separate_ones():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = tiny_lm(fused_qkv=True)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens())["params"])
    shardings = sharding.param_shardings(abstract, mesh, sharding.DEFAULT_RULES)
    qkv = shardings["decoder"]["layers"]["attn"][FUSED_QKV]
    # layers, embed, the three projections, heads, kv
    assert qkv["kernel"].spec == PartitionSpec(None, "fsdp", None, "tensor", None)
    assert abstract["decoder"]["layers"]["attn"][FUSED_QKV]["kernel"].value.shape == (
        3,
        32,
        3,
        4,
        8,
    )
