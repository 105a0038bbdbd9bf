"""Every attention kernel that runs here matches the explicit einsum reference, in outputs and
in gradients w.r.t. q, k, v; `resolve_impl` picks, falls back and refuses as documented.

splash (TPU) and pallas_gpu (Triton) run on CPU in Pallas interpret mode; cudnn needs a GPU
(the `gpu`-marked test). Masks: causal, full with key padding, and persistent-memory-like
(always-visible key columns after the context, causal over the context, key padding).
"""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn import attention_backends
from deepscale_jax.nn.attention import (
    MultiHeadAttention,
    causal_mask,
    combine_masks,
    padding_mask,
)
from deepscale_jax.nn.attention_backends import (
    EXPLICIT,
    MaskSpec,
    attend,
    current_backend,
    explicit_attention,
    resolve_impl,
)
from deepscale_jax.nn.initializers import LayerInit
from deepscale_jax.schemes import build_scheme

B, T, H, D, MEMORY = 2, 128, 2, 64, 16
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _valid() -> jax.Array:
    return jnp.ones((B, T), bool).at[1, 96:].set(False)  # the second sequence ends at 96


def _spec(kind: str) -> MaskSpec:
    if kind == "causal":
        return MaskSpec(causal=True)
    if kind == "padding":
        return MaskSpec(kv_valid=_valid())
    assert kind == "memory"
    return MaskSpec(kv_valid=_valid(), causal=True, memory_columns=MEMORY)


def _inputs(kind: str, dtype, seed: int = 0):
    kv_len = T + (MEMORY if kind == "memory" else 0)
    kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (B, T, H, D), jnp.float32)
    k = jax.random.normal(kk, (B, kv_len, H, D), jnp.float32)
    v = jax.random.normal(kv, (B, kv_len, H, D), jnp.float32)
    # Output cotangent: zero on padded query rows, whose outputs every loss ignores (the
    # kernels mask keys only, so those rows legitimately differ between impls).
    rows = _valid() if kind != "causal" else jnp.ones((B, T), bool)
    g = jax.random.normal(kg, (B, T, H, D), jnp.float32) * rows[:, :, None, None]
    return (x.astype(dtype) for x in (q, k, v, g)), rows


def _out_and_grads(fn, q, k, v, g):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(g.astype(out.dtype))


@pytest.mark.parametrize(
    "impl,kind,dtype",
    [
        (impl, kind, jnp.float32)
        for impl in ("xla", "splash", "pallas_gpu")
        for kind in ("causal", "padding", "memory")
    ]
    + [(impl, "memory", jnp.bfloat16) for impl in ("xla", "splash", "pallas_gpu")],
)
def test_kernel_matches_explicit_reference(impl, kind, dtype):
    (q, k, v, g), rows = _inputs(kind, dtype)
    spec = _spec(kind)
    dense = spec.dense(T, k.shape[1])

    @jax.jit
    def both(q, k, v, g, spec, dense):
        kernel = lambda q, k, v: attend(q, k, v, spec, impl, interpret=True)
        # The reference runs in float32 on the same (possibly bf16-rounded) inputs.
        f32 = lambda x: x.astype(jnp.float32)
        reference = lambda q, k, v: explicit_attention(f32(q), f32(k), f32(v), dense)
        return _out_and_grads(kernel, q, k, v, g), _out_and_grads(reference, q, k, v, g)

    (out, grads), (ref_out, ref_grads) = both(q, k, v, g, spec, dense)
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype
    keep = np.asarray(rows)[:, :, None, None]
    np.testing.assert_allclose(
        np.where(keep, np.asarray(out, np.float32), 0.0),
        np.where(keep, np.asarray(ref_out, np.float32), 0.0),
        atol=tol,
        rtol=tol,
    )
    for name, got, want in zip("qkv", grads, ref_grads, strict=True):
        np.testing.assert_allclose(
            np.asarray(got, np.float32),
            np.asarray(want, np.float32),
            atol=tol,
            rtol=tol,
            err_msg=f"d{name}",
        )


def test_mask_spec_dense_is_the_project_masks():
    valid = _valid()
    causal = MaskSpec(kv_valid=valid, causal=True).dense(T, T)
    ones = jnp.ones_like(valid)
    np.testing.assert_array_equal(causal, combine_masks(causal_mask(T), padding_mask(ones, valid)))
    memory = MaskSpec(kv_valid=valid, causal=True, memory_columns=3).dense(T, T + 3)
    np.testing.assert_array_equal(memory[..., :T], causal)
    assert bool(memory[..., T:].all())  # memory columns are visible to every query
    assert MaskSpec().dense(4, 6).shape == (1, 1, 4, 6)
    with pytest.raises(ValueError, match="causal MaskSpec needs as many queries"):
        MaskSpec(causal=True).dense(4, 6)


def _resolve(requested, **overrides):
    kwargs = dict(backend="cpu", dtype=jnp.float32, head_dim=64, q_len=128, kv_len=128)
    return resolve_impl(requested, **{**kwargs, **overrides})


def test_auto_on_cpu_is_xla_with_one_logged_reason(caplog, monkeypatch):
    impl, reason = _resolve("auto")
    assert impl == "xla" and "no fused attention kernel for backend cpu" in reason
    if current_backend() != "cpu":
        pytest.skip("the logging half checks the CPU fallback")
    monkeypatch.setattr(attention_backends, "_LOGGED", set())
    caplog.set_level(logging.INFO, logger="absl")
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (B, 16, H, 8)) for i in range(3))

    @jax.jit
    def auto_and_reference(q, k, v):
        out = attend(q, k, v, MaskSpec(causal=True), "auto")
        return out, explicit_attention(q, k, v, causal_mask(q.shape[1]))

    for length in (8, 16):  # two traces, one line
        out, ref = auto_and_reference(q[:, :length], k[:, :length], v[:, :length])
        np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)
    lines = [r for r in caplog.records if "no fused attention kernel for backend cpu" in r.message]
    assert len(lines) == 1


def test_auto_picks_the_fused_kernel_where_it_can():
    bf16 = dict(backend="cuda", dtype=jnp.bfloat16)
    assert _resolve("auto", **bf16)[0] == "cudnn"
    impl, reason = _resolve("auto", backend="cuda")
    assert impl == "xla" and "needs bfloat16 or float16" in reason
    impl, reason = _resolve("auto", **bf16, head_dim=160)
    assert impl == "xla" and "<= 128" in reason
    assert _resolve("auto", **bf16, head_dim=160, capability=(9, 0))[0] == "cudnn"
    dense = jnp.ones((1, 1, 127, 127), bool)
    impl, reason = _resolve("auto", **bf16, q_len=127, kv_len=127, mask=dense)
    assert impl == "xla" and "even query and key lengths" in reason
    assert _resolve("auto", **bf16, q_len=127, kv_len=127)[0] == "cudnn"  # no mask, no bias
    assert _resolve("auto", backend="tpu", mask=MaskSpec(causal=True))[0] == "splash"
    impl, reason = _resolve("auto", backend="tpu", mask=dense)
    assert impl == "xla" and "only structured masks" in reason


def test_explicit_impl_that_cannot_run_here_is_an_error():
    with pytest.raises(
        ValueError, match=r"model.attention_impl='cudnn'.*Accepted here: auto, xla$"
    ):
        _resolve("cudnn")
    with pytest.raises(ValueError, match="model.attention_impl='splash'.*TPU kernel"):
        _resolve("splash", has_dropout=True)  # dropout does not hide a config error
    with pytest.raises(ValueError, match="only structured masks"):
        _resolve("pallas_gpu", interpret=True, mask=jnp.ones((1, 1, 128, 128), bool))
    with pytest.raises(ValueError, match="self-attention only"):
        _resolve("pallas_gpu", interpret=True, q_len=64)
    with pytest.raises(ValueError, match="unknown model.attention_impl='flash'"):
        _resolve("flash")
    assert _resolve("splash", interpret=True) == ("splash", "")


class _DropoutAttention(nn.Module):
    impl: str
    explicit: bool = False

    @nn.compact
    def __call__(self, q, k, v, mask, deterministic):
        dropout = nn.Dropout(0.5, broadcast_dims=(), name="dropout")
        if self.explicit:
            return explicit_attention(q, k, v, mask, dropout, deterministic)
        return attend(q, k, v, mask, self.impl, dropout=dropout, deterministic=deterministic)


def test_dropout_forces_the_explicit_path():
    assert _resolve("auto", has_dropout=True)[0] == EXPLICIT
    assert _resolve("splash", interpret=True, has_dropout=True)[0] == EXPLICIT
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (B, 8, H, 16)) for i in range(3))
    mask = causal_mask(8)
    rngs = {"dropout": jax.random.PRNGKey(7)}

    @jax.jit
    def outputs():
        run = lambda module, det: module.apply({}, q, k, v, mask, det, rngs=rngs)
        return (
            run(_DropoutAttention("auto"), False),
            run(_DropoutAttention("auto", explicit=True), False),
            run(_DropoutAttention("auto"), True),
            explicit_attention(q, k, v, mask),
        )

    dropped, dropped_explicit, kept, reference = outputs()
    np.testing.assert_allclose(dropped, dropped_explicit)
    assert not np.allclose(dropped, kept)  # dropout did act
    np.testing.assert_allclose(kept, reference, atol=1e-6)


def test_multi_head_attention_takes_auto_and_mask_specs():
    cfg = ModelConfig(d_model=32, num_heads=2)
    init = LayerInit(build_scheme({"name": "xavier"}, cfg).for_stack("decoder"))
    x = jax.random.normal(jax.random.PRNGKey(0), (B, 8, 32))
    valid = jnp.ones((B, 8), bool).at[1, 5:].set(False)
    dense = combine_masks(causal_mask(8), padding_mask(jnp.ones_like(valid), valid))
    xla = MultiHeadAttention(2, impl="xla")
    params = jax.jit(lambda: xla.init(jax.random.PRNGKey(1), x, dense, init))()
    spec = MaskSpec(kv_valid=valid, causal=True)
    auto = MultiHeadAttention(2, impl="auto")
    both = jax.jit(lambda p: (xla.apply(p, x, dense, init), auto.apply(p, x, spec, init)))
    want, got = both(params)
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["cudnn", "pallas_gpu"])
@pytest.mark.parametrize("kind", ["causal", "padding", "memory"])
def test_gpu_kernels_match_reference_in_bf16(impl, kind):
    if current_backend() != "cuda":
        pytest.skip(f"needs an NVIDIA GPU; backend is {current_backend()}")
    (q, k, v, g), rows = _inputs(kind, jnp.bfloat16)
    spec = _spec(kind)
    dense = spec.dense(T, k.shape[1])
    f32 = lambda x: x.astype(jnp.float32)
    out, grads = _out_and_grads(lambda q, k, v: attend(q, k, v, spec, impl), q, k, v, g)
    ref_out, ref_grads = _out_and_grads(
        lambda q, k, v: explicit_attention(f32(q), f32(k), f32(v), dense), q, k, v, g
    )
    keep = np.asarray(rows)[:, :, None, None]
    np.testing.assert_allclose(
        np.where(keep, np.asarray(out, np.float32), 0),
        np.where(keep, np.asarray(ref_out), 0),
        atol=2e-2,
        rtol=2e-2,
    )
    for got, want in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2e-2, rtol=2e-2)
    if impl == "cudnn":  # the dense-mask form too
        out = attend(q, k, v, dense, "cudnn")
        np.testing.assert_allclose(
            np.where(keep, np.asarray(out, np.float32), 0),
            np.where(keep, np.asarray(ref_out), 0),
            atol=2e-2,
            rtol=2e-2,
        )


@pytest.mark.tpu
@pytest.mark.parametrize("kind", ["causal", "padding", "memory"])
def test_splash_on_tpu_matches_reference_in_bf16(kind):
    if current_backend() != "tpu":
        pytest.skip(f"needs a TPU; backend is {current_backend()}")
    (q, k, v, _), rows = _inputs(kind, jnp.bfloat16)
    spec = _spec(kind)
    f32 = lambda x: x.astype(jnp.float32)
    out = attend(q, k, v, spec, "splash")
    ref = explicit_attention(f32(q), f32(k), f32(v), spec.dense(T, k.shape[1]))
    keep = np.asarray(rows)[:, :, None, None]
    np.testing.assert_allclose(
        np.where(keep, np.asarray(out, np.float32), 0), np.where(keep, ref, 0), atol=2e-2
    )
