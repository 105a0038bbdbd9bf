r"""Analytic training FLOPs per step, achieved FLOP/s and model FLOPs utilisation (MFU).

Counting (model FLOPs, as PaLM's MFU; Chowdhery et al. 2022, appendix B):
- a matmul (m, k) x (k, n) is 2 m k n FLOPs; only matmuls are counted (norms, softmax,
  activations, dropout, the loss and the optimizer are elementwise and left out);
- per layer and sequence of T query tokens attending to S keys, with d = d_model, f = d_ff:
      Q, K, V, O projections   2 T d^2 each (K, V over the S key rows: 2 S d^2 each)
      scores Q K^T, probs V    2 P d each, P = the (query, key) pairs computed
      FFN                      2 * 2 T d f
  P = T S for full attention, `causal_fraction` * T^2 (1/2) for causal self-attention, plus
  T N with N persistent-memory slots (Sukhbaatar et al. 2019) that every query sees;
- embeddings are a gather (0 FLOPs); the unembedding (tied or not) is 2 T d V; a ViT adds its
  patch embedding 2 N_p (p^2 C) d and its classifier 2 d classes per image;
- training = forward + backward = 3 x forward: the backward pass computes the gradient w.r.t.
  both operands of every matmul, 2 x its forward FLOPs (Kaplan et al. 2020, sec. 2.1: C = 6N
  per token = 2N forward + 4N backward). The one exception: the ViT patch embedding's input is
  the image, whose gradient is not computed, so it counts 2 x forward. Rematerialisation is
  not counted (the recomputed forward is hardware FLOPs, not model FLOPs).
For a decoder LM this is the familiar per-sequence C = 6 N T + 3 * 4 n_layer T^2 d * c, with
N = n_layer (4 d^2 + 2 d d_ff) + d V the matmul parameters and c = causal_fraction (Kaplan et
al. 2020 eq. 2.1 and table 1, whose context term 2 n_layer n_ctx d per token is the c = 1/2
forward of the two score matmuls; PaLM appendix B's 6N + 12 L H Q T per token counts them at
full T; Hoffmann et al. 2022 (Chinchilla) appendix F also counts the input embedding, as a
one-hot matmul, which this code runs as a gather).

Model variants: memory tokens m (Burtsev et al. 2020) lengthen the stack's sequence to m + T;
with "prepend" in a causal stack memory rows see the m memory rows and sequence rows see the
memory plus the causal sequence (P = m^2 + m T + T^2/2); "bottleneck" layers are two read steps
(memory reads [memory ; sequence], then the sequence reads the memory). The MAtt decoder
(Zhang et al. 2019) has one attention with Q on the target, K on the source, V on both and one
output projection; its averaged branch is a cumulative sum (0 FLOPs).

Peaks: `PEAK_BF16_FLOPS` (dense bf16 per device as jax enumerates devices, vendor data sheets),
`PEAK_F32_FLOPS` (what a float32 matmul runs at under jax's default precision: TF32 tensor cores
on NVIDIA Ampere and newer, one bf16 pass on TPU), or on CPU / unknown devices the measured
FLOP/s of a large `jnp.dot` (`measured_matmul_peak`).

The training loop calls
    flops_per_step = train_flops_per_step_for(config)              # once
    peak = peak_flops_per_device(jax.devices()[0], config.model.dtype)   # once
    perf_metrics(flops_per_step, step_seconds, jax.device_count(), peak)  # per log step
which gives perf/tflops_per_sec_per_device and perf/mfu.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from deepscale_jax.model_config import ModelConfig

BACKWARD_FACTOR = 2.0  # backward matmul FLOPs per forward matmul FLOP (two operand gradients)
CAUSAL_FRACTION = 0.5  # share of the T x T score matrix a causal mask keeps (model FLOPs)

# Dense bfloat16 peak FLOP/s per jax device, matched by substring of `device.device_kind`, most
# specific first. TPU v4 / v5p: one jax device per chip (megacore); v5e ("TPU v5 lite"), v6e
# ("TPU v6 lite") one core per chip. Sources: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e};
# NVIDIA A100 / H100 / H200 data sheets (dense, without sparsity).
PEAK_BF16_FLOPS: dict[str, float] = {
    "TPU v6 lite": 918e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p chips report "TPU v5"
    "TPU v4": 275e12,
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM: "NVIDIA H100 80GB HBM3"
    "A100": 312e12,
}
# float32 matmuls at jax's default precision: TF32 on NVIDIA (data-sheet dense TF32), a single
# bf16 pass on TPU (so the bf16 peak).
PEAK_F32_FLOPS: dict[str, float] = {
    **{kind: peak for kind, peak in PEAK_BF16_FLOPS.items() if kind.startswith("TPU")},
    "H200": 494.7e12,
    "H100 PCIe": 378e12,
    "H100": 494.7e12,
    "A100": 156e12,
}


# ---------------------------------------------------------------------------------------------
# Building blocks (forward FLOPs of one sequence unless a batch is given)


def matmul_flops(m: float, k: float, n: float) -> float:
    """(m, k) x (k, n): 2 m k n (one multiply and one add per term)."""
    return 2.0 * m * k * n


def causal_pairs(length: int, causal_fraction: float = CAUSAL_FRACTION) -> float:
    """(query, key) pairs of causal self-attention over `length` tokens: fraction * T^2."""
    return causal_fraction * length * length


def attention_flops(q_len: int, kv_len: int, pairs: float, d_model: int, kv_proj_len=None) -> float:
    """One attention, forward: Q and O projections on q_len rows, K and V on `kv_proj_len`
    (default kv_len) rows, scores Q K^T and probs x V over `pairs` (query, key) pairs; the heads
    together are d_model wide (2 P d each)."""
    kv_rows = kv_len if kv_proj_len is None else kv_proj_len
    projections = 2 * matmul_flops(q_len, d_model, d_model) + 2 * matmul_flops(
        kv_rows, d_model, d_model
    )
    return projections + 2 * 2.0 * pairs * d_model


def ffn_flops(length: int, cfg: ModelConfig) -> float:
    """act(x W1) W2 over `length` rows: 2 x 2 T d f; 0 without the FFN (`use_ffn=False`)."""
    return 2 * matmul_flops(length, cfg.d_model, cfg.d_ff) if cfg.use_ffn else 0.0


def self_attention_pairs(length: int, causal: bool, cfg: ModelConfig, causal_fraction: float):
    """(query, key) pairs of one self-attention over the stack's `length` = m + T rows
    (m = memory tokens), persistent-memory slots included."""
    m = cfg.memory_tokens
    seq = length - m
    if causal:
        # memory rows see the memory; sequence rows see the memory and the causal sequence
        pairs = m * m + seq * m + causal_pairs(seq, causal_fraction)
    else:
        pairs = float(length * length)
    return pairs + length * cfg.persistent_memory


def stack_forward_flops(
    cfg: ModelConfig, length: int, depth: int, causal: bool, causal_fraction: float
) -> float:
    """One sequence through `depth` single-stream layers (LM, MLM and ViT stacks, the
    seq2seq encoder); `length` counts the memory tokens already."""
    d, m, n = cfg.d_model, cfg.memory_tokens, cfg.persistent_memory
    if m and cfg.memory_mode == "bottleneck":
        seq = length - m
        memory_step = attention_flops(m, length, m * length + m * n, d) + ffn_flops(m, cfg)
        sequence_step = attention_flops(seq, m, seq * m + seq * n, d) + ffn_flops(seq, cfg)
        return depth * (memory_step + sequence_step)
    pairs = self_attention_pairs(length, causal, cfg, causal_fraction)
    return depth * (attention_flops(length, length, pairs, d) + ffn_flops(length, cfg))


def decoder_forward_flops(
    cfg: ModelConfig, tgt_len: int, context_len: int, causal_fraction: float
) -> float:
    """One target sequence through the encoder-decoder's decoder: per layer causal
    self-attention + cross-attention to `context_len` encoder rows + FFN, or with MAtt one
    merged attention (Q, O on the target; K on the context; V on both) + FFN."""
    d, t, s = cfg.d_model, tgt_len, context_len
    if cfg.merged_attention:
        attention = attention_flops(t, s, t * s, d) + matmul_flops(t, d, d)  # + W_v on target
    else:
        self_pairs = causal_pairs(t, causal_fraction) + t * cfg.persistent_memory
        attention = attention_flops(t, t, self_pairs, d) + attention_flops(t, s, t * s, d)
    return cfg.num_layers * (attention + ffn_flops(t, cfg))


# ---------------------------------------------------------------------------------------------
# Whole models, forward, per batch


def lm_forward_flops(
    cfg: ModelConfig,
    batch_size: int,
    seq_len: int,
    causal: bool = True,
    causal_fraction: float = CAUSAL_FRACTION,
) -> float:
    """Decoder LM (causal) or encoder MLM (`causal=False`): stack + unembedding 2 T d V."""
    length = seq_len + cfg.memory_tokens
    stack = stack_forward_flops(cfg, length, cfg.num_layers, causal, causal_fraction)
    return batch_size * (stack + matmul_flops(seq_len, cfg.d_model, cfg.vocab_size))


def seq2seq_forward_flops(
    cfg: ModelConfig,
    batch_size: int,
    src_len: int,
    tgt_len: int,
    causal_fraction: float = CAUSAL_FRACTION,
) -> float:
    """Encoder (bidirectional, `encoder_layers` deep, over m + S rows) + decoder (reads all
    m + S encoder rows) + unembedding of the T target positions."""
    context = src_len + cfg.memory_tokens
    encoder = stack_forward_flops(
        cfg, context, cfg.stack_depth("encoder"), causal=False, causal_fraction=causal_fraction
    )
    decoder = decoder_forward_flops(cfg, tgt_len, context, causal_fraction)
    return batch_size * (encoder + decoder + matmul_flops(tgt_len, cfg.d_model, cfg.vocab_size))


def vit_forward_flops(
    cfg: ModelConfig,
    batch_size: int,
    num_patches: int,
    patch_dim: int,
    num_classes: int,
    cls_token: bool = True,
) -> float:
    """Patch embedding 2 N_p (p^2 C) d + bidirectional stack over N_p (+1) (+m) tokens +
    classifier 2 d classes (on the pooled vector)."""
    d = cfg.d_model
    length = num_patches + int(cls_token) + cfg.memory_tokens
    stack = stack_forward_flops(cfg, length, cfg.num_layers, causal=False, causal_fraction=1.0)
    patch = matmul_flops(num_patches, patch_dim, d)
    return batch_size * (patch + stack + matmul_flops(1, d, num_classes))


# ---------------------------------------------------------------------------------------------
# Training step


def train_flops_per_step(
    model_config: ModelConfig,
    batch_size: int,
    seq_len: int = 0,
    *,
    src_len: int = 0,
    vit: Any = None,
    causal_fraction: float = CAUSAL_FRACTION,
) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward; see the module doc).

    decoder_only: LM on (batch_size, seq_len); encoder_only: MLM on (batch_size, seq_len), or a
    ViT when `vit` (a models.vit.ViTConfig) is given; encoder_decoder: source `src_len`, target
    `seq_len`. `causal_fraction` is the share of causal score pairs counted (1/2; 1.0 gives
    what a dense-masked kernel executes)."""
    cfg = model_config
    if cfg.architecture == "encoder_decoder":
        if not src_len:
            raise ValueError("an encoder_decoder model needs src_len (and seq_len = tgt_len)")
        forward = seq2seq_forward_flops(cfg, batch_size, src_len, seq_len, causal_fraction)
        return (1 + BACKWARD_FACTOR) * forward
    if vit is not None:
        patch_dim = vit.patch_size * vit.patch_size * vit.channels
        forward = vit_forward_flops(
            cfg, batch_size, vit.num_patches, patch_dim, vit.num_classes, vit.pool == "cls"
        )
        patch = batch_size * matmul_flops(vit.num_patches, patch_dim, cfg.d_model)
        return (1 + BACKWARD_FACTOR) * forward - patch  # no gradient w.r.t. the image
    causal = cfg.architecture == "decoder_only"
    forward = lm_forward_flops(cfg, batch_size, seq_len, causal, causal_fraction)
    return (1 + BACKWARD_FACTOR) * forward


def train_flops_per_step_for(config: Any, causal_fraction: float = CAUSAL_FRACTION) -> float:
    """`train_flops_per_step` of a whole experiment config (an ml_collections ConfigDict as
    configs/*.py build it): the model section, `train.batch_size` and the shapes the task
    `config.task` feeds (lm/mlm: train.seq_len; seq2seq: data src_len/tgt_len; vit: the
    image, patch and class count of config.vit and the dataset)."""
    cfg = ModelConfig.from_mapping(config.model.to_dict())
    batch = int(config.train.batch_size)
    task = config.task
    if task in ("lm", "mlm"):
        return train_flops_per_step(
            cfg, batch, int(config.train.seq_len), causal_fraction=causal_fraction
        )
    if task == "seq2seq":
        from deepscale_jax.tasks.seq2seq import data_module

        data = data_module(config)
        src, tgt = data.option(config.data, "src_len"), data.option(config.data, "tgt_len")
        return train_flops_per_step(cfg, batch, tgt, src_len=src, causal_fraction=causal_fraction)
    if task == "vit":
        from deepscale_jax.tasks.vit import vit_config

        return train_flops_per_step(cfg, batch, vit=vit_config(config))
    raise ValueError(f"no FLOP count for task={task!r}; known: lm, mlm, seq2seq, vit")


# ---------------------------------------------------------------------------------------------
# Peaks and utilisation


def table_peak(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """The data-sheet peak of a device kind (substring match, first hit), or None."""
    table = PEAK_BF16_FLOPS if jnp.dtype(dtype) == jnp.bfloat16 else PEAK_F32_FLOPS
    for kind, peak in table.items():
        if kind in device_kind:
            return peak
    return None


@functools.cache
def measured_matmul_peak(
    dtype: str = "float32", size: int = 2048, repeats: int = 7, warmup: int = 2
) -> float:
    """FLOP/s of a jitted (size x size) @ (size x size) `jnp.dot` on the default device: the
    median of `repeats` timed runs after `warmup` runs, each ended by `block_until_ready`
    (2 size^3 FLOPs per run). Cached per (dtype, size, repeats, warmup)."""
    keys = jax.random.split(jax.random.PRNGKey(0))
    a, b = (jax.random.normal(k, (size, size), jnp.float32).astype(dtype) for k in keys)
    dot = jax.jit(jnp.dot)
    for _ in range(warmup):
        jax.block_until_ready(dot(a, b))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        times.append(time.perf_counter() - start)
    return matmul_flops(size, size, size) / statistics.median(times)


def peak_flops_per_device(device: Any = None, dtype: str = "bfloat16") -> float:
    """Peak FLOP/s of one device for matmuls in `dtype`: the data-sheet figure of its kind
    (`PEAK_BF16_FLOPS` / `PEAK_F32_FLOPS`), else (CPU, unknown accelerators) the measured
    `measured_matmul_peak(dtype)` (a few seconds on a CPU, once per process)."""
    device = jax.devices()[0] if device is None else device
    peak = table_peak(device.device_kind, dtype)
    return peak if peak is not None else measured_matmul_peak(jnp.dtype(dtype).name)


def achieved_flops_per_device(
    flops_per_step: float, step_seconds: float, num_devices: int
) -> float:
    """Model FLOP/s per device: flops_per_step / step_seconds / num_devices."""
    return flops_per_step / step_seconds / num_devices


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak: float) -> float:
    """Model FLOPs utilisation (PaLM appendix B): achieved model FLOP/s per device / peak."""
    return achieved_flops_per_device(flops_per_step, step_seconds, num_devices) / peak


def perf_metrics(
    flops_per_step: float, step_seconds: float, num_devices: int, peak: float
) -> dict[str, float]:
    """{"perf/tflops_per_sec_per_device", "perf/mfu"} for one log interval."""
    achieved = achieved_flops_per_device(flops_per_step, step_seconds, num_devices)
    return {"perf/tflops_per_sec_per_device": achieved / 1e12, "perf/mfu": achieved / peak}
