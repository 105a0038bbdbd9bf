"""Attention kernels behind `model.attention_impl`: one entry point, `attend`.

    out = attend(q, k, v, mask, impl, dropout=..., deterministic=...)

computes softmax(q k^T / sqrt(D) + mask) v on (B, T, H, D) tensors with any of
- "xla": `jax.nn.dot_product_attention(implementation="xla")`, the reference; it materialises
  the (B, H, Tq, Tk) logits, softmax in float32. Runs everywhere.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused flash
  attention. NVIDIA GPU, bfloat16/float16 only, head_dim a multiple of 8 and <= 128 (<= 256 on
  Hopper and newer). jax turns a boolean mask into an additive bias (0 / -2^41 in the input
  dtype, `combine_bias_and_mask`) of the full (Tq, Tk) size, and training with a bias needs even
  Tq and Tk. A causal `MaskSpec` without memory columns becomes `is_causal=True` (cuDNN skips
  the masked blocks) plus a key-padding bias only when there is padding.
- "splash": Pallas TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`),
  block-sparse: fully masked blocks are skipped. TPU only; `interpret=True` runs it on any
  backend (slowly; for tests).
- "pallas_gpu": Pallas/Triton flash attention (`jax.experimental.pallas.ops.gpu.attention.mha`).
  GPU only; `interpret=True` runs it anywhere.
- "auto": the fastest kernel that can run this call (cudnn on an NVIDIA GPU, splash on TPU,
  else xla), logged once per distinct decision (absl, at trace time).

Masks are True = may attend and come in two forms:
- a dense boolean array (B or 1, 1, Tq, Tk): anything; xla and cudnn take it;
- a `MaskSpec`: the structured masks this project uses, i.e. causal or full over the context,
  key padding of the context (`kv_valid`), and `memory_columns` always-visible key columns
  appended after the context (persistent memory). Every impl takes it; splash and pallas_gpu
  take only this form, since their masks are static (built when the kernel is made) plus
  segment ids, not a traced dense array.
`None` means every key is visible (a full `MaskSpec`).

Never `is_causal` for masks with extra key columns: jax's causal mask is top-left aligned over
all Tk columns, which would hide the memory columns.

Rows whose query is padding are not masked by `MaskSpec` (only keys are); what the kernels write
there differs between impls and must be ignored by the loss, as the dense path's fully masked
rows (a uniform average) are.

Choosing (`resolve_impl`): "auto" never raises. An explicit impl that cannot run this call
(wrong backend, dtype, head size or mask form) raises a ValueError naming
`model.attention_impl` and the impls that would run here. One exception, for every impl:
dropout on the attention probabilities (training with `model.attn_dropout` > 0) is implemented
by no fused kernel, so it always takes the explicit einsum path (`explicit_attention`), logged
once.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from absl import logging

from deepscale_jax.model_config import ATTENTION_IMPLS

KERNELS = ("xla", "cudnn", "splash", "pallas_gpu")
# Impls `resolve_impl` may return: the kernels plus the einsum path used for dropout.
EXPLICIT = "explicit"


@flax.struct.dataclass
class MaskSpec:
    """A structured mask over keys [context (S) ; memory (N = memory_columns)].

    Query t sees context key s if (not causal or s <= t) and kv_valid[b, s]; every query sees
    every memory key. Causal needs Tq == S (self-attention). `kv_valid` (B, S) bool, or None for
    no key padding. A pytree: `kv_valid` is a leaf, `causal` and `memory_columns` are static.
    """

    kv_valid: jax.Array | None = None
    causal: bool = flax.struct.field(pytree_node=False, default=False)
    memory_columns: int = flax.struct.field(pytree_node=False, default=0)

    def context_len(self, kv_len: int) -> int:
        return kv_len - self.memory_columns

    def check(self, q_len: int, kv_len: int) -> None:
        context = self.context_len(kv_len)
        if context < 0:
            raise ValueError(f"{self.memory_columns} memory columns exceed {kv_len} keys")
        if self.causal and q_len != context:
            raise ValueError(
                f"a causal MaskSpec needs as many queries as context keys; got {q_len} queries, "
                f"{context} context keys (+ {self.memory_columns} memory)"
            )
        if self.kv_valid is not None and self.kv_valid.shape[-1] != context:
            raise ValueError(
                f"MaskSpec.kv_valid covers {self.kv_valid.shape[-1]} keys, the context has "
                f"{context}"
            )

    def key_valid(self, kv_len: int) -> jax.Array | None:
        """(B, Tk) validity of all keys (memory columns always valid), or None."""
        if self.kv_valid is None:
            return None
        valid = self.kv_valid.astype(bool)
        memory = jnp.ones((valid.shape[0], self.memory_columns), bool)
        return jnp.concatenate([valid, memory], axis=1)

    def dense(self, q_len: int, kv_len: int) -> jax.Array:
        """The same mask as a dense (B or 1, 1, Tq, Tk) boolean array."""
        self.check(q_len, kv_len)
        context = self.context_len(kv_len)
        cols = jnp.arange(kv_len)[None, :]
        if self.causal:
            visible = (cols <= jnp.arange(q_len)[:, None]) | (cols >= context)
        else:
            visible = jnp.ones((q_len, kv_len), bool)
        visible = visible[None, None]
        key = self.key_valid(kv_len)
        return visible if key is None else visible & key[:, None, None, :]


def dense_mask(mask: jax.Array | MaskSpec | None, q_len: int, kv_len: int) -> jax.Array | None:
    """A dense boolean mask (or None) from either form."""
    return mask.dense(q_len, kv_len) if isinstance(mask, MaskSpec) else mask


def explicit_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    dropout: nn.Dropout | None = None,
    deterministic: bool = True,
) -> jax.Array:
    """Reference softmax attention on (B, T, H, D) tensors; softmax in float32; optional
    dropout on the probabilities. Masked logits get float32's min (a fully masked row
    averages, as in the xla path)."""
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if dropout is not None:
        probs = dropout(probs, deterministic=deterministic)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)


# ---------------------------------------------------------------------------------------------
# Choosing an implementation


def current_backend() -> str:
    """ "cpu", "tpu", "cuda", "rocm" (or another platform name) of the default device."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    try:
        version = jax.devices()[0].client.platform_version.lower()
    except Exception:  # pragma: no cover - depends on the jaxlib build
        return "cuda"
    return "rocm" if "rocm" in version else "cuda"


def gpu_capability() -> tuple[int, int] | None:
    """Compute capability of the first CUDA device, e.g. (9, 0); None elsewhere."""
    try:
        major, minor = jax.devices()[0].compute_capability.split(".")[:2]
        return int(major), int(minor)
    except Exception:
        return None


def _needs_bias(mask) -> bool:
    """Whether the cudnn call carries a mask (hence a bias), given the mask's form."""
    if mask is None:
        return False
    if not isinstance(mask, MaskSpec):
        return True
    if mask.kv_valid is not None:
        return True
    return mask.causal and mask.memory_columns > 0


def _unsupported(
    impl: str,
    *,
    backend: str,
    dtype,
    head_dim: int,
    q_len: int,
    kv_len: int,
    mask,
    interpret: bool,
    capability: tuple[int, int] | None,
) -> str | None:
    """Why `impl` cannot run this call, or None if it can."""
    dtype = jnp.dtype(dtype)
    structured = mask is None or isinstance(mask, MaskSpec)
    if impl == "xla":
        return None
    if impl == "cudnn":
        if backend != "cuda":
            return f"needs an NVIDIA GPU with cuDNN (backend is {backend})"
        if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            return f"needs bfloat16 or float16 inputs (got {dtype.name})"
        max_head = 256 if capability is not None and capability >= (9, 0) else 128
        if head_dim % 8 or head_dim > max_head:
            return f"needs head_dim a multiple of 8 and <= {max_head} (got {head_dim})"
        if _needs_bias(mask) and (q_len % 2 or kv_len % 2):
            return (
                "turns the mask into a bias, and a biased backward pass needs even query and key "
                f"lengths (got {q_len} and {kv_len})"
            )
        return None
    if impl == "splash":
        if backend != "tpu" and not interpret:
            return f"is a TPU kernel (backend is {backend}; interpret mode is for tests)"
        if not structured:
            return (
                "takes only structured masks (MaskSpec: causal or full, key padding, memory "
                "columns), not a dense boolean mask"
            )
        return None
    if impl == "pallas_gpu":
        if backend not in ("cuda", "rocm", "gpu") and not interpret:
            return f"is a GPU (Triton) kernel (backend is {backend}; interpret mode is for tests)"
        if not structured:
            return (
                "takes only structured masks (MaskSpec: causal or full, key padding, memory "
                "columns), not a dense boolean mask"
            )
        memory = mask.memory_columns if isinstance(mask, MaskSpec) else 0
        if q_len != kv_len - memory:
            return (
                "is self-attention only (its segment ids are shared by queries and keys): "
                f"{q_len} queries vs {kv_len - memory} context keys"
            )
        return None
    raise ValueError(f"unknown attention kernel {impl!r}; accepted: {', '.join(KERNELS)}")


def resolve_impl(
    requested: str,
    *,
    backend: str,
    dtype,
    head_dim: int,
    q_len: int,
    kv_len: int,
    has_dropout: bool = False,
    mask=None,
    interpret: bool = False,
    capability: tuple[int, int] | None = None,
) -> tuple[str, str]:
    """(impl, reason): which path runs a call, and why (reason "" when it is the request).

    `requested` is a `model.attention_impl`; `backend` as `current_backend()` ("gpu" counts as
    CUDA); `mask` the call's mask (None, a `MaskSpec`, or anything else for a dense array; only
    its form matters); `capability` the CUDA compute capability (cuDNN's head-dim limit).
    Raises ValueError for an explicit impl that cannot run here (dropout or not); never for
    "auto". Otherwise "explicit" when `has_dropout`.
    """
    if requested not in ATTENTION_IMPLS:
        raise ValueError(
            f"unknown model.attention_impl={requested!r}; accepted: {', '.join(ATTENTION_IMPLS)}"
        )
    if backend == "gpu":
        backend = "cuda"
    check = functools.partial(
        _unsupported,
        backend=backend,
        dtype=dtype,
        head_dim=head_dim,
        q_len=q_len,
        kv_len=kv_len,
        mask=mask,
        interpret=interpret,
        capability=capability,
    )
    shape = f"{jnp.dtype(dtype).name}, head_dim {head_dim}, {q_len}x{kv_len}"
    if requested != "auto":  # an impl that cannot run here is a config error, dropout or not
        why = check(requested)
        if why is not None:
            accepted = [impl for impl in KERNELS if check(impl) is None]
            raise ValueError(
                f"model.attention_impl={requested!r} cannot run here: {requested} {why} "
                f"({shape}). Accepted here: auto, {', '.join(accepted)}"
            )
    if has_dropout:
        return EXPLICIT, (
            f"model.attention_impl={requested!r}: attention dropout is on, so the explicit "
            "einsum path runs (no fused kernel applies dropout to the probabilities)"
        )
    if requested == "auto":
        preferred = {"cuda": "cudnn", "tpu": "splash"}.get(backend)
        if preferred is None:
            return "xla", (
                f"model.attention_impl='auto' -> 'xla': no fused attention kernel for backend "
                f"{backend}"
            )
        why = check(preferred)
        if why is None:
            return preferred, f"model.attention_impl='auto' -> {preferred!r} ({backend}, {shape})"
        return "xla", (
            f"model.attention_impl='auto' -> 'xla' on {backend}: {preferred} {why} ({shape})"
        )
    return requested, ""


_LOGGED: set[str] = set()


def _log_once(message: str, warn: bool) -> None:
    if message and message not in _LOGGED:
        _LOGGED.add(message)
        (logging.warning if warn else logging.info)(message)


# ---------------------------------------------------------------------------------------------
# Kernels


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | MaskSpec | None = None,
    impl: str = "xla",
    *,
    dropout: nn.Dropout | None = None,
    deterministic: bool = True,
    interpret: bool = False,
) -> jax.Array:
    """softmax(q k^T / sqrt(D) + mask) v on (B, Tq, H, D) queries and (B, Tk, H, D) keys and
    values with the kernel `impl` (a `model.attention_impl`; see the module docstring).

    `dropout` (an `nn.Dropout` made by the calling module) applies to the probabilities when
    `not deterministic` and forces the explicit path. `interpret=True` lets splash and
    pallas_gpu run on any backend in Pallas interpret mode (tests)."""
    q_len, kv_len = q.shape[1], k.shape[1]
    if isinstance(mask, MaskSpec):
        mask.check(q_len, kv_len)
    has_dropout = dropout is not None and dropout.rate > 0.0 and not deterministic
    backend = current_backend()
    chosen, reason = resolve_impl(
        impl,
        backend=backend,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        q_len=q_len,
        kv_len=kv_len,
        has_dropout=has_dropout,
        mask=mask,
        interpret=interpret,
        capability=gpu_capability() if backend == "cuda" else None,
    )
    fallback = chosen in ("xla", EXPLICIT) and impl not in ("xla", "auto")
    fallback |= impl == "auto" and chosen == "xla" and backend in ("cuda", "tpu")
    _log_once(reason, warn=fallback)
    if chosen == EXPLICIT:
        return explicit_attention(q, k, v, dense_mask(mask, q_len, kv_len), dropout, deterministic)
    if chosen == "xla":
        dense = dense_mask(mask, q_len, kv_len)
        return jax.nn.dot_product_attention(q, k, v, mask=dense, implementation="xla")
    if chosen == "cudnn":
        return _cudnn(q, k, v, mask)
    spec = mask if isinstance(mask, MaskSpec) else MaskSpec()
    if chosen == "splash":
        return _splash(q, k, v, spec, interpret)
    return _pallas_gpu(q, k, v, spec, interpret)


def _cudnn(q, k, v, mask):
    q_len, kv_len = q.shape[1], k.shape[1]
    is_causal = False
    if isinstance(mask, MaskSpec) and mask.causal and mask.memory_columns == 0:
        is_causal = True  # cuDNN skips the blocks above the diagonal
        mask = dataclasses.replace(mask, causal=False)
    dense = dense_mask(mask, q_len, kv_len)
    if isinstance(mask, MaskSpec) and mask.kv_valid is None and not mask.causal:
        dense = None  # full over context and memory: no bias at all
    if dense is not None:  # jax adds it as a bias, which must span (Tq, Tk)
        dense = jnp.broadcast_to(dense, (*dense.shape[:2], q_len, kv_len))
    return jax.nn.dot_product_attention(
        q, k, v, mask=dense, is_causal=is_causal, implementation="cudnn"
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad_axis1(x: jax.Array, length: int, front: int = 0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[1] = (front, length - x.shape[1] - front)
    return jnp.pad(x, pad)


def _splash_block(length: int) -> int:
    """Largest of 512, 256, 128 dividing `length` (a multiple of 128)."""
    return next(b for b in (512, 256, 128) if length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads, q_pad, kv_pad, context, kv_len, causal, interpret):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    class ContextMask(masks._ComputableMask):  # computed inside the kernel, nothing stored
        def __init__(self):
            def visible(q_ids, kv_ids):
                seen = kv_ids < context
                if causal:
                    seen = seen & (q_ids >= kv_ids)
                return seen | ((kv_ids >= context) & (kv_ids < kv_len))

            super().__init__((q_pad, kv_pad), visible)

        def __eq__(self, other):
            return type(other) is type(self)

        def __hash__(self):
            return hash((q_pad, kv_pad, context, kv_len, causal))

    head_mask = ContextMask()
    bq, bkv = _splash_block(q_pad), _splash_block(kv_pad)
    blocks = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    with jax.ensure_compile_time_eval():  # concrete mask info, safe to reuse across traces
        return splash.make_splash_mha_single_device(
            splash.MultiHeadMask([head_mask] * heads), block_sizes=blocks, interpret=interpret
        )


def _splash(q, k, v, spec: MaskSpec, interpret: bool):
    """Splash on (B, T, H, D): queries and keys padded to multiples of 128 (the padded keys
    masked statically), key padding as kv segment ids, vmapped over the batch."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    q_pad, kv_pad = _round_up(q_len, 128), _round_up(kv_len, 128)
    context = spec.context_len(kv_len)
    kernel = _splash_kernel(heads, q_pad, kv_pad, context, kv_len, spec.causal, interpret)
    scale = 1.0 / math.sqrt(head_dim)  # splash does not scale the logits
    to_bhtd = lambda x, n: jnp.swapaxes(_pad_axis1(x, n), 1, 2)
    qs = to_bhtd((q * scale).astype(q.dtype), q_pad)
    ks, vs = to_bhtd(k, kv_pad), to_bhtd(v, kv_pad)
    key = spec.key_valid(kv_len)
    if key is None:
        out = jax.vmap(kernel)(qs, ks, vs)
    else:
        segments = SegmentIds(
            q=jnp.ones((batch, q_pad), jnp.int32),
            kv=_pad_axis1(key.astype(jnp.int32), kv_pad),
        )
        out = jax.vmap(kernel)(qs, ks, vs, segment_ids=segments)
    return jnp.swapaxes(out, 1, 2)[:, :q_len].astype(q.dtype)


def _pallas_gpu(q, k, v, spec: MaskSpec, interpret: bool):
    """Triton flash attention on (B, T, H, D) self-attention. Memory keys go first and as many
    dummy query rows are prepended, so that its top-left causal mask is ours: query t (row
    N + t) sees memory 0..N-1 and context 0..t. Both sides are padded to one length L (a
    multiple of the block); key padding and, for a full mask, the padded keys are segment 0."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_attention

    batch, q_len, _, head_dim = q.shape
    kv_len = k.shape[1]
    memory = spec.memory_columns
    context = kv_len - memory
    used = memory + q_len
    block = min(128, max(16, 1 << (used - 1).bit_length()))
    length = _round_up(used, block)
    k = jnp.concatenate([k[:, context:], k[:, :context]], axis=1)
    v = jnp.concatenate([v[:, context:], v[:, :context]], axis=1)
    qs = _pad_axis1(q, length, front=memory)
    ks, vs = _pad_axis1(k, length), _pad_axis1(v, length)
    segments = None
    if spec.kv_valid is not None or (not spec.causal and length > used):
        valid = jnp.ones((batch, context), bool) if spec.kv_valid is None else spec.kv_valid
        ids = jnp.concatenate([jnp.ones((batch, memory), bool), valid.astype(bool)], axis=1)
        segments = _pad_axis1(ids.astype(jnp.int32), length)
    blocks = pallas_attention.BlockSizes(
        block_q=block,
        block_k=block,
        block_q_dkv=min(32, block),
        block_kv_dkv=min(32, block),
        block_q_dq=min(32, block),
        block_kv_dq=min(32, block),
    )
    out = pallas_attention.mha(
        qs,
        ks,
        vs,
        segments,
        sm_scale=1.0 / math.sqrt(head_dim),
        causal=spec.causal,
        block_sizes=blocks,
        interpret=interpret,
    )
    return out[:, memory : memory + q_len].astype(q.dtype)
