"""Verification grid of theory/components.py against the real nn/ modules (theory.md sec. 3).

One `SweepCase` per configuration, for the components the authors check ("FFN" is their name
for a single linear layer) plus RMSNorm and ScaleNorm. `predict()` evaluates components.py;
`measure(key)` runs `measure.measure` on a function built from the real module (nn/linear.py
`Dense` with a `normal(sigma)` kernel, nn/norms.py, flax Dropout, nn/mlp.py's activations,
jax.nn.softmax). Errors use the authors' metric (`case_errors_for`), summarised by
`measure.percentiles`.

Grids: `cases(full=True)` is the authors' Cartesian product for each script (sec. 3.1, same
values, shuffled with seed 42; RMSNorm/ScaleNorm use LayerNorm's with mu = 0 added) with at
least the authors' sample counts, more where that count would leave the 90th percentile at the
mercy of Monte Carlo noise (up to 2e7 elements per sampled array). Estimated on 2 shared CPU
cores: ~22 h for the linear layer (13122 configurations), 4-6 h each for LayerNorm, Dropout,
RMSNorm, ScaleNorm; measured: ReLU 12 min, Softmax 25 min, GeLU 87 min (the last two beside
other jobs). `cases()` takes the first
configurations of the same shuffled product restricted to widths <= 316 and L = 16 tokens
(softmax: all of the authors' L), with samples sized so that sampling noise stays well under
the targets (DRAWS); it runs in about a minute on 2 cores.

    python -m deepscale_jax.theory.component_sweeps [--full] [--components FFN ReLU ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import math
import random
import time
import zlib
from collections.abc import Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepscale_jax.nn.initializers import normal
from deepscale_jax.nn.linear import Dense
from deepscale_jax.nn.mlp import ACTIVATION_FNS
from deepscale_jax.nn.norms import LayerNorm, RMSNorm, ScaleNorm
from deepscale_jax.theory import components as C
from deepscale_jax.theory import measure as M

COMPONENTS = ("FFN", "ReLU", "GeLU", "LayerNorm", "Dropout", "Softmax", "RMSNorm", "ScaleNorm")
NORM_EPS = 1e-5  # nn/norms.py default, passed to the modules and to the predictions
S3 = (0.316, 1.0, 3.16)  # np.logspace(-0.5, 0.5, 3), as printed by the authors
R3 = (0.0, 1 / 3, 2 / 3)
R5 = (0.0, 0.2, 0.4, 0.6, 0.8)
D3 = (100, 316, 1000)

AUTHORS: dict[str, dict[str, tuple[float, float, float]]] = dict(M.AUTHORS_PERCENTILES)
# RMSNorm/ScaleNorm are ours: held to LayerNorm's figures where it has a non-trivial one, to the
# GeLU/Dropout ones otherwise.
_OURS_NORM = {
    "x mean": (0.1, 1.0, 2.4),
    "x var": (0.1, 0.5, 1.5),
    "g var": (0.4, 1.5, 3.2),
    "x cov": (0.1, 0.5, 1.0),
    "g cov": (0.2, 0.9, 2.2),
}
AUTHORS["RMSNorm"] = AUTHORS["ScaleNorm"] = _OURS_NORM
TARGETS = {c: {s: v[1] for s, v in stats.items()} for c, stats in AUTHORS.items()}
# A printed "0." means below 0.05%.
TARGETS["LayerNorm"]["x var"] = TARGETS["LayerNorm"]["x covd"] = 0.05
TARGETS["Softmax"]["x mean"] = 0.05

# ------------------------------------------------------------------------------------ grids

Params = dict[str, float]


def _product(**axes: Iterable[float]) -> list[Params]:
    """Authors' Cartesian product of the swept values, shuffled with seed 42 (as run_all.sh)."""
    names = list(axes)
    grid = [dict(zip(names, map(float, v), strict=True)) for v in itertools.product(*axes.values())]
    random.Random(42).shuffle(grid)
    return grid


def _authors_grid(
    component: str, tokens: tuple[int, ...] = (100, 1000), widths: tuple[int, ...] = D3
) -> list[Params]:
    """The authors' sweep of `component` (theory.md sec. 3.1); RMSNorm/ScaleNorm: LayerNorm's
    sweep with mu = 0 added (the mean survives these norms)."""
    if component == "FFN":
        return _product(
            mu=(0.1, 1.0, 10.0), s=S3, r=R3, w=(0.1, 1.0, 10.0), s_g=S3, r_g=R3,
            d1=widths, d2=widths, L=tokens,
        )  # fmt: skip
    if component in ("ReLU", "GeLU"):
        return _product(mu=(0.0,), s=S3, r=R5, s_g=S3, r_g=R5, L=tokens)
    if component in ("LayerNorm", "RMSNorm", "ScaleNorm"):
        mus = (-10.0, -10 / 3, 10 / 3) if component == "LayerNorm" else (-10.0, -10 / 3, 0, 10 / 3)
        return _product(mu=mus, s=S3, r=R5, s_g=S3, r_g=R5, d=widths, L=tokens)
    if component == "Dropout":
        return _product(mu=(-10.0, 0.0, 10.0), s=S3, r=R3, s_g=S3, r_g=R3, p=R3, d=widths, L=tokens)
    if component == "Softmax":
        return _product(
            s=(0.01, 0.032, 0.1, 0.32, 1.0), r=R5, s_g=(0.32, 0.56, 1.0, 1.78, 3.16), r_g=(0.0,),
            L=(300, 720, 1732, 4161, 10000),
        )  # fmt: skip
    raise ValueError(f"unknown component {component!r}; accepted: {', '.join(COMPONENTS)}")


# Default grid: the first configurations of the shuffled product with widths <= 316 and L = 16
# tokens (softmax: the authors' L). None of these predictions depends on L, and the noise of
# every r-dependent statistic is set by the number of independent draws of the shared component
# (runs x i.i.d. features), not by L: the compute goes into runs instead.
DEFAULT_COUNT = {
    "FFN": 16, "ReLU": 20, "GeLU": 16, "LayerNorm": 20, "Dropout": 20, "Softmax": 25,
    "RMSNorm": 20, "ScaleNorm": 20,
}  # fmt: skip
DEFAULT_TOKENS, DEFAULT_WIDTHS = (16,), (100, 316)
# Independent draws of the shared component per configuration (runs x i.i.d. features); for
# Softmax, the number of logits. The authors' run counts (AUTHORS_RUNS) are a floor on full grids.
DRAWS = {
    "FFN": 1.5e5, "ReLU": 2e5, "GeLU": 4e5, "LayerNorm": 2e5, "Dropout": 2e5, "Softmax": 4e6,
    "RMSNorm": 2e5, "ScaleNorm": 2e5,
}  # fmt: skip
AUTHORS_RUNS = {"ReLU": 10_000, "GeLU": 100_000, "Softmax": 10_000}  # others: 100
MAX_ELEMENTS = 2e7  # per sampled array on full grids, above the authors' counts (80 MB float32)
ACTIVATION_FEATURES = 100  # default grid: i.i.d. feature columns for ReLU/GeLU (authors: 1)


def _runs(component: str, p: Params, full: bool) -> int:
    if component == "Softmax":
        need = math.ceil(DRAWS[component] / p["L"])
    else:
        width = p.get("features", min(p.get("d1", p.get("d", 1)), p.get("d2", p.get("d", 1))))
        need = math.ceil(DRAWS[component] / width)
    if not full:
        return need
    per_run = p["L"] * p.get("features", p.get("d1", p.get("d", 1)))
    return max(AUTHORS_RUNS.get(component, 100), min(need, int(MAX_ELEMENTS / per_run)))


def grid(component: str, full: bool = False) -> list[Params]:
    """Parameter dicts of one component's sweep (swept values, plus "runs" and "features")."""
    if full:
        configs = _authors_grid(component)
    else:
        configs = _authors_grid(component, DEFAULT_TOKENS, DEFAULT_WIDTHS)
        configs = configs[: DEFAULT_COUNT[component]]
    if component in ("ReLU", "GeLU"):
        configs = [{**p, "features": 1.0 if full else float(ACTIVATION_FEATURES)} for p in configs]
    return [{**p, "runs": float(_runs(component, p, full))} for p in configs]


# ---------------------------------------------------------------------------- predictions


def _moments(p: Params) -> tuple[M.Signal, M.Grad]:
    return M.Signal(p.get("mu", 0.0), p["s"] ** 2, p["r"]), M.Grad(p["s_g"] ** 2, p["r_g"])


def _predict_pair(component: str, p: Params) -> tuple[M.Signal, M.Grad]:
    x, g = _moments(p)
    if component == "FFN":
        d1, d2 = int(p["d1"]), int(p["d2"])
        shape = {"d_in": d1, "d_out": d2, "sigma_w": p["w"] / math.sqrt(d1)}
        return C.linear_forward(x, **shape), C.linear_backward(x, g, **shape)
    if component in ("ReLU", "GeLU"):
        fwd, bwd = C.ACTIVATIONS[component.lower()]
        return fwd(x), bwd(x, g)
    if component == "Dropout":
        return C.dropout_forward(x, p=p["p"]), C.dropout_backward(x, g, p=p["p"])
    d = int(p["d"])
    if component == "LayerNorm":
        return C.layernorm_forward(x, d=d, eps=NORM_EPS), C.layernorm_backward(
            x, g, d=d, eps=NORM_EPS
        )
    if component == "RMSNorm":
        return C.rmsnorm_forward(x, d=d, eps=NORM_EPS), C.rmsnorm_backward(x, g, d=d, eps=NORM_EPS)
    return C.scalenorm_forward(x, d=d), C.scalenorm_backward(x, g, d=d)


def predict(component: str, p: Params) -> dict[str, float]:
    """Predicted statistics (names of measure.STATISTICS, plus the extras checked)."""
    if component == "Softmax":
        x, g = _moments(p)
        out = {"x mean": 1.0 / p["L"]}
        for form in C.SOFTMAX_FORMS:
            name = form.replace("_", " ")
            out[f"x var {name}"] = C.softmax_forward(x, length=int(p["L"]), form=form).var
            out[f"g var {name}"] = C.softmax_backward(x, g, length=int(p["L"]), form=form).var
        return out
    y, g_in = _predict_pair(component, p)
    out = M.stats_of(y, g_in)
    if component == "LayerNorm":
        out["x covd"] = C.layernorm_feature_cov(_moments(p)[0], d=int(p["d"]), eps=NORM_EPS)
    return out


# ---------------------------------------------------------------------------- measurement


_INIT_KEY = jax.random.PRNGKey(1234)


def _dense(d2: int, sigma: float | jax.Array) -> Dense:
    return Dense((d2,), normal(sigma), ("embed", "mlp"))


@jax.jit
def _apply_dense_runs(params: dict, x: jax.Array) -> jax.Array:
    """Each run's input through its own Dense parameters (the init std plays no part here)."""
    d2 = params["params"]["kernel"].shape[-1]
    return jax.vmap(_dense(d2, 1.0).apply)(params, x)


@functools.partial(jax.jit, static_argnames=("d1", "d2", "runs"))
def _init_dense_runs(sigma: jax.Array, d1: int, d2: int, runs: int) -> dict:
    """Independent Dense(d1 -> d2) parameters per run, from the module's own `.init`."""
    dense = _dense(d2, sigma)
    keys = jax.random.split(_INIT_KEY, runs)
    return nn.meta.unbox(jax.vmap(lambda k: dense.init(k, jnp.zeros((1, d1))))(keys))


_NORMS = {
    "LayerNorm": LayerNorm(eps=NORM_EPS),
    "RMSNorm": RMSNorm(eps=NORM_EPS),
    "ScaleNorm": ScaleNorm(eps=NORM_EPS),
}


def _norm_fn(module: nn.Module) -> Callable[[jax.Array], jax.Array]:
    """The module applied with the parameters of its own `.init` (gain 1, bias 0)."""
    return lambda x: module.apply(module.init(_INIT_KEY, x[:1, :1]), x)


_JIT_FNS = {
    "ReLU": jax.jit(ACTIVATION_FNS["relu"]),
    "GeLU": jax.jit(ACTIVATION_FNS["gelu"]),
    "Softmax": jax.jit(jax.nn.softmax),
    **{name: jax.jit(_norm_fn(module)) for name, module in _NORMS.items()},
}
_DROPOUT_KEY = jax.random.PRNGKey(4321)


@functools.partial(jax.jit, static_argnames="rate")
def _dropout(x: jax.Array, rate: float) -> jax.Array:
    """flax Dropout, deterministic=False, fixed rng (so forward and vjp share one mask)."""
    return nn.Dropout(rate=rate, deterministic=False).apply({}, x, rngs={"dropout": _DROPOUT_KEY})


def _function(component: str, p: Params) -> tuple[Callable, tuple[int, ...], int]:
    """(fn built from the real module, input shape, token axis)."""
    runs, length = int(p["runs"]), int(p["L"])
    if component == "FFN":
        d1, d2 = int(p["d1"]), int(p["d2"])
        params = _init_dense_runs(jnp.float32(p["w"] / math.sqrt(d1)), d1=d1, d2=d2, runs=runs)
        return (lambda x: _apply_dense_runs(params, x)), (runs, length, d1), -2
    if component == "Softmax":
        return _JIT_FNS["Softmax"], (runs, length), -1
    if component == "Dropout":
        return (lambda x: _dropout(x, rate=p["p"])), (runs, length, int(p["d"])), -2
    width = int(p.get("d", p.get("features", 1)))
    return _JIT_FNS[component], (runs, length, width), -2


def measure(component: str, p: Params, key: jax.Array) -> dict[str, float]:
    """Measured statistics, named as `predict` names them."""
    fn, shape, axis = _function(component, p)
    x, g = _moments(p)
    out = M.measure(fn, key, shape, x, g, token_axis=axis)
    if component == "Softmax":
        out = {"x mean": out["x mean"]} | {
            f"{n} var {form.replace('_', ' ')}": out[f"{n} var"]
            for n in "xg"
            for form in C.SOFTMAX_FORMS
        }
    if component == "LayerNorm":  # inter-feature covariance: an exact identity, small sample
        y = fn(M.sample_equicorrelated(jax.random.fold_in(key, 1), (64, *shape[1:]), x))
        out["x covd"] = M.estimate(y, token_axis=-1)[2]
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class SweepCase:
    """One configuration of one component (satisfies measure.Case)."""

    component: str
    params: Mapping[str, float]

    def predict(self) -> dict[str, float]:
        return predict(self.component, dict(self.params))

    def measure(self, key: jax.Array) -> dict[str, float]:
        return measure(self.component, dict(self.params), key)


def cases(
    full: bool = False, components: Iterable[str] = COMPONENTS, limit: int | None = None
) -> list[SweepCase]:
    """Sweep cases, component by component; `limit` keeps the first per component (tests)."""
    out = []
    for component in components:
        out += [SweepCase(component, p) for p in grid(component, full)[:limit]]
    return out


def case_errors_for(
    case: M.Case, measured: Mapping[str, float], predicted: Mapping[str, float]
) -> dict[str, float]:
    """Authors' errors: plain relative for Softmax; "x covd" scaled by the predicted variance."""
    if case.component == "Softmax":
        return M.case_errors(measured, predicted, plain_relative=predicted)
    extra = {k: v for k, v in predicted.items() if k not in M.STATISTICS}
    errors = M.case_errors(measured, {k: predicted[k] for k in predicted if k not in extra})
    for name, value in extra.items():
        errors[name] = M.authors_error(measured[name], value, predicted["x var"])
    return errors


# -------------------------------------------------------------------------------- running


def run(sweep: Iterable[M.Case], seed: int = 42) -> dict[str, dict[str, list[float]]]:
    """Errors per component and statistic. The i-th case of a component draws with the key
    fold_in(fold_in(PRNGKey(seed), crc32(component)), i)."""
    errors: dict[str, dict[str, list[float]]] = {}
    for case in sweep:
        stats = errors.setdefault(case.component, {})
        index = len(next(iter(stats.values()), []))
        key = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(case.component.encode()))
        found = case_errors_for(case, case.measure(jax.random.fold_in(key, index)), case.predict())
        for name, err in found.items():
            stats.setdefault(name, []).append(err)
    return errors


def summary(errors: Mapping[str, Mapping[str, list[float]]]) -> dict[str, dict[str, tuple]]:
    """(p50, p90, p99) in % per component and statistic (measure.percentiles)."""
    return {c: {s: M.percentiles(e) for s, e in stats.items()} for c, stats in errors.items()}


def format_table(table: Mapping[str, Mapping[str, tuple]], seconds: Mapping[str, float]) -> str:
    """Markdown table: our percentiles next to the authors' (targets: their p90)."""
    lines = [
        "| component | statistic | p50 | p90 | p99 | authors p50/p90/p99 | p90 target met |",
        "|---|---|---|---|---|---|---|",
    ]
    for component, stats in table.items():
        for name, (p50, p90, p99) in stats.items():
            ref = AUTHORS.get(component, {}).get(name)
            ref_s = " / ".join(f"{v:g}" for v in ref) if ref else "- (not a target)"
            met = "-" if ref is None else ("yes" if p90 <= TARGETS[component][name] else "NO")
            lines.append(
                f"| {component} | {name} | {p50:.3g} | {p90:.3g} | {p99:.3g} | {ref_s} | {met} |"
            )
    lines.append("")
    lines += [f"{component}: {t:.1f} s" for component, t in seconds.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--components", nargs="*", default=list(COMPONENTS))
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    errors, seconds = {}, {}
    for component in args.components:
        start = time.perf_counter()
        errors |= run(cases(args.full, [component]), args.seed)
        seconds[component] = time.perf_counter() - start
    print(format_table(summary(errors), seconds))


if __name__ == "__main__":
    main()
