"""Attention kernels: forward + backward time and memory per `model.attention_impl`.

For each impl that can run on this backend (`resolve_impl`), dtype and sequence length, times
one jitted forward + backward (grads w.r.t. q, k, v) of causal self-attention through
`nn.attention_backends.attend`: the median of --repeats runs after --warmup runs, each ended
with `block_until_ready`. Memory: XLA's compiled `memory_analysis()` temp (scratch) size of that
program, everywhere; the device's `peak_bytes_in_use` where `memory_stats()` exists (GPU/TPU;
a process-wide high-water mark, so only its growth along a sweep is meaningful), else n/a.
"explicit" is the einsum path that attention dropout uses, timed without dropout.

    python benchmarks/attention.py                      # defaults for this backend
    python benchmarks/attention.py --seq-lens 512,2048 --dtypes bfloat16 --out /tmp/attn.json

Defaults: GPU/TPU lengths 512..8192, batch 2, 8 heads; CPU lengths 256, 512, 1024, batch 1,
4 heads (about a minute on 2 cores); head_dim 64. splash and pallas_gpu run only on their own
hardware here (their CPU interpret mode is for tests and far too slow to time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from deepscale_jax.nn.attention_backends import (
    KERNELS,
    MaskSpec,
    attend,
    current_backend,
    dense_mask,
    explicit_attention,
    gpu_capability,
    resolve_impl,
)

MIB = 1024 * 1024


def _runnable(impl, backend, dtype, args, length) -> bool:
    if impl == "explicit":
        return True
    try:
        resolve_impl(
            impl,
            backend=backend,
            dtype=dtype,
            head_dim=args.head_dim,
            q_len=length,
            kv_len=length,
            mask=MaskSpec(causal=True),
            capability=gpu_capability(),
        )
    except ValueError:
        return False
    return True


def _step(impl: str):
    spec = MaskSpec(causal=True)

    def loss(q, k, v, g):
        if impl == "explicit":
            length = q.shape[1]
            out = explicit_attention(q, k, v, dense_mask(spec, length, length))
        else:
            out = attend(q, k, v, spec, impl)
        return jnp.sum(out.astype(jnp.float32) * g)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def measure(impl: str, dtype, length: int, args) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    shape = (args.batch, length, args.heads, args.head_dim)
    q, k, v, g = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)
    step = _step(impl)
    start = time.perf_counter()
    compiled = step.lower(q, k, v, g).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    temp = getattr(analysis, "temp_size_in_bytes", None) if analysis is not None else None
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(q, k, v, g))
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, g))
        times.append(time.perf_counter() - start)
    peak = _peak_bytes()
    return {
        "impl": impl,
        "dtype": jnp.dtype(dtype).name,
        "seq_len": length,
        "fwd_bwd_ms": 1e3 * statistics.median(times),
        "compile_s": compile_s,
        "temp_mib": None if temp is None else temp / MIB,
        "peak_mib": None if peak is None else peak / MIB,
    }


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main() -> None:
    backend = current_backend()
    on_cpu = backend == "cpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--seq-lens", default="256,512,1024" if on_cpu else "512,1024,2048,4096,8192"
    )
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--impls", default=",".join((*KERNELS, "explicit")))
    parser.add_argument("--batch", type=int, default=1 if on_cpu else 2)
    parser.add_argument("--heads", type=int, default=4 if on_cpu else 8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()

    device = jax.devices()[0]
    print(
        f"backend {backend} ({device.device_kind}), batch {args.batch}, heads {args.heads}, "
        f"head_dim {args.head_dim}, causal, fwd+bwd median of {args.repeats}"
    )
    header = "| impl | dtype | seq | fwd+bwd ms | temp MiB | peak MiB | compile s |"
    print(header + "\n|" + "---|" * (header.count("|") - 1), flush=True)
    rows = []
    for dtype in (jnp.dtype(d) for d in args.dtypes.split(",")):
        for impl in args.impls.split(","):
            for length in (int(n) for n in args.seq_lens.split(",")):
                if not _runnable(impl, backend, dtype, args, length):
                    continue
                try:
                    row = measure(impl, dtype, length, args)
                except Exception as error:  # e.g. out of memory at long lengths
                    row = {"impl": impl, "dtype": dtype.name, "seq_len": length}
                    row["error"] = f"{type(error).__name__}: {str(error)[:120]}"
                    print(f"| {impl} | {dtype.name} | {length} | {row['error']} | | | |")
                    rows.append(row)
                    continue
                rows.append(row)
                print(
                    f"| {impl} | {row['dtype']} | {length} | {row['fwd_bwd_ms']:.2f} | "
                    f"{_fmt(row['temp_mib'], '.1f')} | {_fmt(row['peak_mib'], '.1f')} | "
                    f"{row['compile_s']:.2f} |",
                    flush=True,
                )
    if args.out:
        meta = {"backend": backend, "device": device.device_kind, **vars(args)}
        with open(args.out, "w") as f:
            json.dump({"config": meta, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
