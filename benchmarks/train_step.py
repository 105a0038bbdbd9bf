"""Training-step speed and memory of the real train step, with sweeps.

Builds exactly what `train.train_and_evaluate` builds for a config (`validate_config`,
`tasks.build_task`, `optim.make_optimizer`, `train.create_train_state`, `train.jit_train_step`
with its shardings and donated state) and feeds it synthetic batches of the task's shapes (no
data pipeline in the timing). Per row:
- step time: median (and min/max) of --steps steps after --warmup steps, each ended by
  `block_until_ready` on the new state; tokens/s (the task's `units_per_step`);
- model TFLOP/s per device (`deepscale_jax.flops.train_flops_per_step_for`, causal scores at
  half, remat not counted) and MFU against `flops.peak_flops_per_device`: the data-sheet peak on
  GPU/TPU, on CPU the FLOP/s of a large `jnp.dot` measured in the same process just before the
  steps (`flops.measured_matmul_peak`);
- compile time: wall time of `lower(state, batch).compile()` of the jitted step (tracing
  included; a fresh process per row, so no warm compilation cache);
- memory: XLA's `compiled.memory_analysis()`: `xla_mib` = argument + output + temp - alias
  bytes (alias: the donated state the outputs reuse), and `temp_mib` alone; on CPU also the
  process's max RSS growth from just before the state is created to after the timed steps
  (`resource.getrusage`, so it includes the state, the compiled program and the allocator's
  slack); on GPU/TPU the device's `peak_bytes_in_use`.
Each row runs in a fresh subprocess (clean max RSS and compile caches; --in-process to turn it
off). A depth sweep also fits step time = a + b * layers (least squares) and reports b, a, R^2.

    python -m benchmarks.train_step --config configs/lm.py:default,layers=12 --steps 10
    python -m benchmarks.train_step --config configs/lm.py:default --sweep depth \
        --depths 12,48,96,192 --set remat=full --out /tmp/depth.json
    python -m benchmarks.train_step --config configs/lm.py:default --sweep remat
    python -m benchmarks.train_step --config ... --baseline --guard --breakdown

Sweeps (--sweep): depth (--depths), remat (--remats: none, full, dots, dots_no_batch,
sublayer_outputs), scan (scanned vs unrolled), qkv (separate vs fused QKV projection), dtype
(float32; bfloat16 compute with float32 params), batch (--batches). Rows that cannot run here
(e.g. attention_impl=cudnn off an NVIDIA GPU, a task whose data is missing) are reported as
skipped with the reason.
Extras for the first row's config: --baseline times a plain unrolled Flax LM of the same shape
written inline (nn.Embed, nn.MultiHeadDotProductAttention, nn.LayerNorm, nn.Dense; AdamW);
--guard times the divergence guard's `tree.map(jnp.where)` over a state-sized tree alone;
--breakdown times the forward, forward+backward, the optimizer update and the guard separately.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MIB = 1024 * 1024
REMATS = "none,full,dots,dots_no_batch,sublayer_outputs"


# ---------------------------------------------------------------------------------------------
# Config and batches


def load_config(spec: str, overrides: list[str]):
    """`configs/lm.py:preset,k=v` -> the ConfigDict, then each `k=v` of `overrides`."""
    from configs import common

    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for item in overrides:
        key, value = item.split("=", 1)
        common.set_path(config, key.strip(), value.strip())
    return config


def synthetic_batch(task: Any, config: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A global batch of the shapes and dtypes `task.loss` reads, random contents."""
    b, vocab = config.train.batch_size, config.model.vocab_size

    def ids(length: int) -> np.ndarray:
        return rng.integers(0, vocab, (b, length), dtype=np.int32)

    name = config.task
    if name == "lm":
        t = config.train.seq_len
        return {"inputs": ids(t), "targets": ids(t)}
    if name == "mlm":
        t = config.train.seq_len
        ones = np.ones((b, t), np.float32)
        return {"inputs": ids(t), "valid": ones > 0, "targets": ids(t), "weights": ones}
    if name == "seq2seq":
        s, t = task.src_len, task.tgt_len
        return {
            "inputs": ids(s),
            "inputs_valid": np.ones((b, s), bool),
            "decoder_inputs": ids(t),
            "targets_valid": np.ones((b, t), bool),
            "targets": ids(t),
            "weights": np.ones((b, t), np.float32),
        }
    if name == "vit":
        vit = task.model.vit
        shape = (b, vit.image_size, vit.image_size, vit.channels)
        return {
            "image": rng.standard_normal(shape).astype(np.float32),
            "label": rng.integers(0, vit.num_classes, (b,), dtype=np.int32),
            "weights": np.ones((b,), np.float32),
        }
    raise ValueError(f"no synthetic batch for task={name!r}")


# ---------------------------------------------------------------------------------------------
# Timing helpers


def time_calls(fn, args_fn, warmup: int, steps: int) -> list[float]:
    """Wall seconds of `steps` calls `fn(*args_fn())` after `warmup`, each block_until_ready."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args_fn()))
    times = []
    for _ in range(steps):
        args = args_fn()
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def device_peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def compiled_bytes(compiled) -> tuple[int | None, int | None]:
    """(argument + output + temp - alias, temp) bytes of XLA's memory analysis."""
    m = compiled.memory_analysis()
    if m is None:
        return None, None
    total = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )
    return total, m.temp_size_in_bytes


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares y = a + b x: intercept a, slope b, R^2."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    b, a = np.polyfit(x, y, 1)
    residual = y - (a + b * x)
    total = np.sum((y - y.mean()) ** 2)
    return {"intercept_s": a, "slope_s_per_layer": b, "r2": 1 - np.sum(residual**2) / total}


# ---------------------------------------------------------------------------------------------
# One row: the real train step


def measure_row(spec: str, overrides: list[str], args) -> dict:
    """Times the real jitted train step of the config `spec` + `overrides`."""
    from deepscale_jax import flops, sharding, train
    from deepscale_jax.data.device_feed import to_global
    from deepscale_jax.optim import make_optimizer, make_schedule
    from deepscale_jax.tasks import build_task
    from deepscale_jax.validation import validate_config

    config = load_config(spec, overrides)
    model_config, scheme = validate_config(config)
    mesh = sharding.make_mesh(config.mesh.shape.to_dict())
    rules = sharding.logical_rules(config.mesh.get("rules"))
    batch_sharding = sharding.batch_sharding(mesh)
    task = build_task(config, model_config, scheme)
    num_steps = max(config.train.num_steps, args.warmup + args.steps + 1)
    tx, schedule = make_optimizer(config.optim, num_steps), make_schedule(config.optim, num_steps)
    rss_before = max_rss_bytes()
    state, shardings = train.create_train_state(
        task.model, tx, mesh, rules, config.train.seed, task.init_inputs()
    )
    step = train.jit_train_step(
        task, tx, schedule, shardings, batch_sharding, config.train.max_bad_steps
    )
    rng = np.random.default_rng(0)
    batches = [to_global(synthetic_batch(task, config, rng), batch_sharding) for _ in range(2)]
    start = time.perf_counter()
    compiled = step.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start
    xla_bytes, temp_bytes = compiled_bytes(compiled)
    dtype = model_config.dtype
    peak = flops.peak_flops_per_device(jax.devices()[0], dtype)
    holder = {"state": state, "i": 0}

    def run(batch):
        holder["state"], metrics = compiled(holder["state"], batch)
        return holder["state"], metrics

    def next_args():
        holder["i"] += 1
        return (batches[holder["i"] % 2],)

    times = time_calls(run, next_args, args.warmup, args.steps)
    rss_after = max_rss_bytes()
    step_s = statistics.median(times)
    flops_per_step = flops.train_flops_per_step_for(config)
    n = jax.device_count()
    achieved = flops.achieved_flops_per_device(flops_per_step, step_s, n)
    device_peak = device_peak_bytes()
    row = {
        "overrides": overrides,
        "task": config.task,
        "layers": model_config.num_layers,
        "d_model": model_config.d_model,
        "heads": model_config.num_heads,
        "d_ff": model_config.d_ff,
        "batch": config.train.batch_size,
        "seq_len": config.train.get("seq_len"),
        "scan": model_config.scan_layers,
        "fused_qkv": model_config.fused_qkv,
        "remat": model_config.remat_policy,
        "dtype": dtype,
        "devices": n,
        "step_s": step_s,
        "step_min_s": min(times),
        "step_max_s": max(times),
        "units_per_s": task.units_per_step() / step_s,
        "unit": task.unit,
        "flops_per_step": flops_per_step,
        "tflops_per_s_per_device": achieved / 1e12,
        "peak_tflops_per_device": peak / 1e12,
        "peak_source": "table"
        if flops.table_peak(jax.devices()[0].device_kind, dtype)
        else ("measured jnp.dot"),
        "mfu": achieved / peak,
        "compile_s": compile_s,
        "xla_mib": None if xla_bytes is None else xla_bytes / MIB,
        "temp_mib": None if temp_bytes is None else temp_bytes / MIB,
        "rss_growth_mib": (rss_after - rss_before) / MIB,
        "max_rss_mib": rss_after / MIB,
        "device_peak_mib": None if device_peak is None else device_peak / MIB,
    }
    if args.guard:
        row.update(measure_guard(holder["state"], args))
    if args.breakdown:
        row.update(measure_breakdown(task, tx, holder["state"], batches[0], args))
    if args.baseline:
        row.update(measure_baseline(config, model_config, batches[0], peak, args))
    return row


def measure_guard(state, args) -> dict:
    """The divergence guard alone: tree.map(jnp.where(apply, new, old)) over params and
    optimizer state (what `train.make_train_step` does after every update), jitted, with
    `new` donated as in the step."""
    trees = (state.params, state.opt_state)
    new = jax.tree.map(lambda x: x + 0, trees)

    @jax.jit
    def keep(apply, new, old):
        return jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)

    flag = jnp.array(True)
    times = time_calls(keep, lambda: (flag, new, trees), args.warmup, args.steps)
    size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trees))
    return {"guard_s": statistics.median(times), "guard_tree_mib": size / MIB}


def measure_breakdown(task, tx, state, batch, args) -> dict:
    """Forward (loss), forward + backward (value_and_grad), optimizer update + apply, each
    jitted alone: where the step's time goes."""
    import optax

    rngs = {"dropout": jax.random.PRNGKey(0)}

    def loss(params):
        total, count = task.loss(params, batch, deterministic=False, rngs=rngs)
        return total / count

    forward = jax.jit(loss)
    grad = jax.jit(jax.value_and_grad(loss))
    params = state.params
    _, grads = grad(params)

    @jax.jit
    def update(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    out = {}
    for name, fn, call_args in (
        ("forward_s", forward, (params,)),
        ("fwd_bwd_s", grad, (params,)),
        ("optimizer_s", update, (grads, state.opt_state, params)),
    ):
        out[name] = statistics.median(
            time_calls(fn, lambda a=call_args: a, args.warmup, args.steps)
        )
    return out


# ---------------------------------------------------------------------------------------------
# Baseline: a plain unrolled Flax LM of the same shape


def baseline_lm(model_config):
    """Pre-LN decoder LM from stock linen modules: token + learned position embeddings,
    N x [LN, causal MultiHeadDotProductAttention, LN, Dense-act-Dense], final LN, tied logits."""
    import flax.linen as nn

    cfg = model_config
    act = jax.nn.relu if cfg.activation == "relu" else jax.nn.gelu
    dtype = jnp.dtype(cfg.dtype)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, mask):
            h = nn.LayerNorm(dtype=dtype)(x)
            x = x + nn.MultiHeadDotProductAttention(cfg.num_heads, dtype=dtype)(h, h, mask=mask)
            h = nn.LayerNorm(dtype=dtype)(x)
            h = nn.Dense(cfg.d_model, dtype=dtype)(act(nn.Dense(cfg.d_ff, dtype=dtype)(h)))
            return x + h

    class PlainLM(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype)
            pos = self.param(
                "pos", nn.initializers.normal(0.02), (cfg.max_len, cfg.d_model), jnp.float32
            )
            x = embed(tokens) + pos[: tokens.shape[1]].astype(dtype)
            mask = nn.make_causal_mask(tokens)
            for _ in range(cfg.num_layers):
                x = Block()(x, mask)
            x = nn.LayerNorm(dtype=dtype)(x)
            return embed.attend(x).astype(jnp.float32)

    return PlainLM()


def measure_baseline(config, model_config, batch, peak, args) -> dict:
    """The plain LM's train step (value_and_grad + the same AdamW), jitted with the state
    donated: an upper reference for what this machine reaches on the same shape."""
    import optax

    from deepscale_jax import flops
    from deepscale_jax.metrics import token_cross_entropy
    from deepscale_jax.optim import make_optimizer

    if config.task != "lm":
        return {"baseline": f"skipped: the baseline is an LM, task={config.task!r}"}
    model = baseline_lm(model_config)
    tx = make_optimizer(config.optim, config.train.num_steps)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["inputs"])["params"]
    state = (params, tx.init(params))

    def step(state, batch):
        params, opt_state = state

        def loss(p):
            logits = model.apply({"params": p}, batch["inputs"])
            total, count = token_cross_entropy(logits, batch["targets"])
            return total / count

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
    holder = {"state": state}

    def run():
        holder["state"], value = compiled(holder["state"], batch)
        return value

    times = time_calls(run, lambda: (), args.warmup, args.steps)
    step_s = statistics.median(times)
    flops_per_step = flops.train_flops_per_step_for(config)
    achieved = flops.achieved_flops_per_device(flops_per_step, step_s, jax.device_count())
    return {
        "baseline_step_s": step_s,
        "baseline_tflops_per_s": achieved / 1e12,
        "baseline_mfu": achieved / peak,
    }


# ---------------------------------------------------------------------------------------------
# Sweeps and the table


def sweep_rows(args) -> list[list[str]]:
    """The override lists of the rows to run."""
    base = list(args.set)
    if args.sweep == "none":
        return [base]
    values = {
        "depth": [f"layers={n}" for n in args.depths.split(",")],
        "remat": [f"remat={r}" for r in args.remats.split(",")],
        "scan": ["scan=true", "scan=false"],
        "qkv": ["model.fused_qkv=false", "model.fused_qkv=true"],
        "dtype": [f"model.dtype={d}" for d in args.dtypes.split(",")],
        "batch": [f"batch={b}" for b in args.batches.split(",")],
    }[args.sweep]
    return [[*base, v] for v in values]


def run_row(overrides: list[str], args) -> dict:
    """One row, in a fresh process unless --in-process."""
    if args.in_process:
        try:
            return measure_row(args.config, overrides, args)
        except Exception as error:  # report it and go on with the sweep
            return {"overrides": overrides, "skipped": f"{type(error).__name__}: {error}"[:300]}
    cmd = [sys.executable, "-m", "benchmarks.train_step", *sys.argv[1:]]
    cmd += ["--row", json.dumps(overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("ROW "):
            return json.loads(line[4:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"overrides": overrides, "skipped": tail[:300]}


COLUMNS = (
    ("layers", "layers", "d"),
    ("remat", "remat", "s"),
    ("scan", "scan", ""),
    ("fused qkv", "fused_qkv", ""),
    ("dtype", "dtype", "s"),
    ("batch", "batch", "d"),
    ("step s", "step_s", ".3f"),
    ("min-max s", None, None),
    ("units/s", "units_per_s", ",.0f"),
    ("TFLOP/s", "tflops_per_s_per_device", ".4f"),
    ("MFU", "mfu", ".1%"),
    ("compile s", "compile_s", ".2f"),
    ("XLA MiB", "xla_mib", ".0f"),
    ("RSS+ MiB", "rss_growth_mib", ".0f"),
    ("dev peak MiB", "device_peak_mib", ".0f"),
)


def format_row(row: dict) -> str:
    if "skipped" in row:
        return f"| {' '.join(row['overrides'])} | skipped: {row['skipped']} |"
    cells = []
    for _, key, spec in COLUMNS:
        if key is None:
            cells.append(f"{row['step_min_s']:.3f}-{row['step_max_s']:.3f}")
        elif row.get(key) is None:
            cells.append("n/a")
        else:
            cells.append(format(row[key], spec))
    return "| " + " | ".join(cells) + " |"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/lm.py:default", help="file.py:preset,k=v")
    parser.add_argument("--set", action="append", default=[], help="k=v override (repeatable)")
    parser.add_argument("--sweep", default="none", choices=("none", *SWEEPS))
    parser.add_argument("--depths", default="12,48,96,192")
    parser.add_argument("--remats", default=REMATS)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="4,8,16,32")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--baseline", action="store_true", help="also time a plain Flax LM")
    parser.add_argument("--guard", action="store_true", help="also time the guard alone")
    parser.add_argument("--breakdown", action="store_true", help="fwd / fwd+bwd / optimizer")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per row")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print JSON
    return parser.parse_args(argv)


SWEEPS = ("depth", "remat", "scan", "qkv", "dtype", "batch")


def main() -> None:
    args = parse_args()
    if args.row is not None:
        row = measure_row(args.config, json.loads(args.row), args)
        print("ROW " + json.dumps(row), flush=True)
        return
    device = jax.devices()[0]
    print(
        f"backend {jax.default_backend()} ({device.device_kind}), {jax.device_count()} "
        f"device(s), {os.cpu_count()} CPUs; config {args.config} {' '.join(args.set)}; "
        f"median of {args.steps} steps after {args.warmup}",
        flush=True,
    )
    header = "| " + " | ".join(name for name, _, _ in COLUMNS) + " |"
    print(header + "\n|" + "---|" * len(COLUMNS), flush=True)
    rows = []
    for overrides in sweep_rows(args):
        row = run_row(overrides, args)
        rows.append(row)
        print(format_row(row), flush=True)
    extras = [
        "guard_s",
        "guard_tree_mib",
        "forward_s",
        "fwd_bwd_s",
        "optimizer_s",
        "baseline_step_s",
        "baseline_tflops_per_s",
        "baseline_mfu",
        "peak_tflops_per_device",
        "peak_source",
        "flops_per_step",
    ]
    for row in rows:
        found = {k: row[k] for k in extras if k in row}
        if found:
            print(" ".join(row.get("overrides", [])) or "row", json.dumps(found))
    result: dict[str, Any] = {"rows": rows}
    timed = [r for r in rows if "skipped" not in r]
    if args.sweep == "depth" and len(timed) >= 2:
        fit = linear_fit([r["layers"] for r in timed], [r["step_s"] for r in timed])
        result["depth_fit"] = fit
        print(
            f"step time = {fit['intercept_s']:.4f} s + {fit['slope_s_per_layer'] * 1e3:.2f} ms "
            f"x layers (R^2 = {fit['r2']:.4f})"
        )
    if args.out:
        meta = {"backend": jax.default_backend(), "device": device.device_kind, **vars(args)}
        result["config"] = meta
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
