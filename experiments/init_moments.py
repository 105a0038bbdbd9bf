"""Init moments at depth: every scheme, Pre-LN and Post-LN, measured on the real LM and predicted.

For each scheme (schemes/) and each norm placement the scheme allows, a decoder LM of
`--layers` layers (d=128, 4 heads, byte vocabulary) is initialised and run forward and
backward on one batch of Shakespeare validation text (`--model mlm`: the bidirectional
encoder with the masked-LM loss on 15% masked bytes, the setting of the DeepScaleLM paper's
figures; `--dropout 0.1`: their dropout, measured in training mode). Per layer: residual-stream
variance, inter-token correlation and weight-gradient norm, measured (theory/model_measure.py
`measure_lm`) and predicted (`predict_lm`, the composed moment maps, anchored at the measured
embedding output and top-layer gradient). Prints a table of the laws, writes JSON (`--out`)
and a figure of seed 0 (with `--seeds` > 1 also one of the seeds' geometric means).

    python -m experiments.init_moments --out experiments/results/init_moments.json
    python -m experiments.init_moments --layers 192        # the depth of the paper's figures
    python -m experiments.init_moments --model mlm --out experiments/results/init_moments_mlm.json
    python -m experiments.init_moments --schemes xavier,dslm --dropout 0.1 --seeds 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import numpy as np

from deepscale_jax.schemes import SCHEMES
from deepscale_jax.theory.model import Profile
from experiments import signal_propagation
from experiments.signal_propagation import check_width, lm_at_init, seed_ensemble, text_batch

MODEL = dataclasses.replace(signal_propagation.MODEL, num_layers=96)
STATISTICS = (
    ("var", "residual variance"),
    ("corr", "inter-token correlation"),
    ("weight_grad_norm", "weight-gradient norm"),
)
ENSEMBLE_QUANTITIES = tuple(name for name, _ in STATISTICS)


def variants(names: list[str]) -> list[tuple[str, str, str]]:
    """(scheme, norm, placement) for every placement each scheme is defined for; schemes
    without normalisation run once (Pre- and Post-LN are the same model there)."""
    out = []
    for name in names:
        cls = SCHEMES[name]
        norm = "layer_norm" if cls.norms is None or "layer_norm" in cls.norms else cls.norms[0]
        placements = ("pre",) if norm == "none" else cls.placements
        out.extend((name, norm, placement) for placement in placements)
    return out


def max_error(predicted: np.ndarray, measured: np.ndarray) -> float | None:
    """max over layers of |predicted / measured - 1| (None where nothing is measured)."""
    if np.all(measured == 0) and np.all(predicted == 0):
        return None
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.max(np.abs(predicted / measured - 1)))


def laws(profile: Profile) -> dict[str, float | None]:
    """The summary figures the laws are stated in (layers 1..N); weight-gradient ratios are
    None where the weights get no gradient at init (ReZero's branches behind a zero gate)."""
    return curve_laws(profile.var, profile.weight_grad_norm)


def curve_laws(var: np.ndarray, wg: np.ndarray | None) -> dict[str, float | None]:
    """`laws` of a variance curve (embedding output, layers 1..N) and a weight-gradient-norm
    curve (layers 1..N, None: nothing to compare)."""
    var = np.asarray(var)[1:]
    wg = None if wg is None else np.asarray(wg)
    ratio = lambda a, b: float(a / b) if b > 0 else None
    return {
        "var_min": float(var.min()),
        "var_max": float(var.max()),
        "var_last_over_first": float(var[-1] / var[0]),
        "wg_max_over_min": None if wg is None else ratio(wg.max(), wg.min()),
        "wg_last_over_first": None if wg is None else ratio(wg[-1], wg[0]),
    }


def ensemble_laws(ensemble: dict) -> dict[str, dict[str, float | None]]:
    """The laws of the seeds' geometric-mean curves (`seed_ensemble`), measured and
    predicted: the typical model's, which the theory predicts. A ratio of geometric means is
    the geometric mean of the single seeds' ratios."""
    wg = ensemble["weight_grad_norm"]
    return {
        f"laws_{kind}": curve_laws(ensemble["var"][kind], None if wg is None else wg[kind])
        for kind in ("measured", "predicted")
    }


def _fmt(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None or not np.isfinite(value) else f"{value:>{width}.3g}"


def run_variant(
    scheme: str,
    norm: str,
    placement: str,
    layers: int,
    tokens: jax.Array,
    targets: jax.Array,
    model_kind: str = "lm",
    seed: int = 0,
    d_model: int = MODEL.d_model,
    dropout: float = 0.0,
) -> dict:
    """Measured and predicted per-layer moments of one (scheme, norm, placement) at init, at
    width `d_model` (d_ff = 4 d_model). `dropout` > 0: hidden and attention dropout at that
    rate, measured in training mode on one draw of the masks (the authors' setting, p = 0.1;
    shared/reference/theory.md 2.7), which the schemes' init and the theory both take in."""
    _, predicted, measured = lm_at_init(
        layers, placement, tokens, targets, scheme, norm, model_kind, seed, d_model, dropout
    )
    errors = {
        name: max_error(getattr(predicted, name), getattr(measured, name)) for name, _ in STATISTICS
    }
    keep = ("var", "corr", "weight_grad_norm")
    return {
        "model": model_kind,
        "scheme": scheme,
        "norm": norm,
        "placement": placement,
        "layers": layers,
        "d_model": d_model,
        "seed": seed,
        "dropout": dropout,
        "measured": {k: getattr(measured, k).tolist() for k in keep},
        "predicted": {k: getattr(predicted, k).tolist() for k in keep},
        "laws_measured": laws(measured),
        "laws_predicted": laws(predicted),
        "max_rel_error": errors,
    }


def format_table(results: list[dict]) -> str:
    head = (
        f"{'scheme':<9}{'placement':<10}{'var min..max':>16}{'var L/1':>9}"
        f"{'wg max/min':>12}{'wg L/1':>9}   {'max error: var / corr / wg (%)'}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        m, p, e = r["laws_measured"], r["laws_predicted"], r["max_rel_error"]
        placement = "no norm" if r["norm"] == "none" else f"{r['placement']}-LN"
        errors = " / ".join(
            "-" if e[k] is None else f"{100 * e[k]:.1f}"
            for k in ("var", "corr", "weight_grad_norm")
        )
        for label, laws_ in (
            (f"{r['scheme']:<9}{placement:<10}", m),
            (f"{'':<9}{'(theory)':<10}", p),
        ):
            lines.append(
                f"{label}{_fmt(laws_['var_min'], 7)}..{_fmt(laws_['var_max'], 7)}"
                f"{_fmt(laws_['var_last_over_first'], 9)}{_fmt(laws_['wg_max_over_min'], 12)}"
                f"{_fmt(laws_['wg_last_over_first'], 9)}   {errors if laws_ is m else ''}"
            )
    return "\n".join(lines)


def format_ensembles(ensembles: list[dict]) -> str:
    """Per variant: the theory's max error against the seed-mean measured curves, the range
    of the single seeds' max errors (%) and, for the scale quantities, the largest standard
    error of the seed mean's log error over layers."""
    lines = [
        f"seed means ({len(ensembles[0]['seeds'])} seeds): max error, (single seeds)"
        " [standard error of the log error, max over layers]"
    ]

    def standard_error(stats: dict) -> str:
        se = stats["log_error_standard_error"]
        return "" if se is None else f" [{max(se):.2f}]"

    for e in ensembles:
        cells = ", ".join(
            f"{q} -"
            if e[q] is None
            else f"{q} {100 * e[q]['max_rel_error']:.1f} "
            f"({100 * min(e[q]['per_seed_max_rel_error']):.0f}"
            f"-{100 * max(e[q]['per_seed_max_rel_error']):.0f}){standard_error(e[q])}"
            for q in ENSEMBLE_QUANTITIES
        )
        lines.append(f"  {e['scheme']:<9}{e['placement'] + '-LN':<9}{cells}")
    laws_of_means = [
        {
            **e,
            "max_rel_error": {
                q: None if e[q] is None else e[q]["max_rel_error"] for q in ENSEMBLE_QUANTITIES
            },
        }
        for e in ensembles
        if "laws_measured" in e
    ]
    if laws_of_means:
        lines += ["the laws of the seed means (geometric means):", format_table(laws_of_means)]
    return "\n".join(lines)


Curves = dict[str, tuple[list, list, tuple[list, list] | None] | None]


def run_curves(result: dict) -> Curves:
    """statistic -> (measured, predicted, no band) of one run."""
    return {
        name: (result["measured"][name], result["predicted"][name], None) for name, _ in STATISTICS
    }


def ensemble_curves(ensemble: dict) -> Curves:
    """statistic -> (geometric-mean measured, predicted, the single seeds' range) of a seed
    ensemble (`seed_ensemble`); None where it has nothing to compare (ReZero's weights)."""
    return {
        name: None
        if ensemble[name] is None
        else (
            ensemble[name]["measured"],
            ensemble[name]["predicted"],
            (ensemble[name]["measured_min"], ensemble[name]["measured_max"]),
        )
        for name, _ in STATISTICS
    }


def plot(entries: list[tuple[dict, Curves]], path: str) -> None:
    """One row per scheme, one panel per statistic: measured (dots; with the seeds' range as a
    band for a seed ensemble) and predicted (line) per placement. `entries`: (a run or
    ensemble record, naming scheme, norm and placement; its curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = list(dict.fromkeys(record["scheme"] for record, _ in entries))
    fig, axes = plt.subplots(
        len(schemes), len(STATISTICS), figsize=(15, 3 * len(schemes)), squeeze=False
    )
    colors = {"pre": "tab:blue", "post": "tab:red"}
    for row, scheme in zip(axes, schemes, strict=True):
        for record, curves in (e for e in entries if e[0]["scheme"] == scheme):
            label = "no norm" if record["norm"] == "none" else f"{record['placement']}-LN"
            color = colors[record["placement"]]
            for ax, (name, title) in zip(row, STATISTICS, strict=True):
                if curves[name] is None or not np.any(curves[name][0]):
                    continue  # ReZero's weights get no gradient at init
                measured, predicted, band = curves[name]
                x = np.arange(len(measured)) + (name == "weight_grad_norm")
                if band is not None:
                    ax.fill_between(x, *band, color=color, alpha=0.15)
                ax.plot(x, measured, "o", ms=2, color=color, label=f"{label} measured")
                ax.plot(x, predicted, "-", color=color, label=f"{label} predicted")
                ax.set_title(f"{scheme}: {title}")
                if name != "corr":
                    ax.set_yscale("log")
        row[0].legend(fontsize=7)
        row[-1].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=96)
    parser.add_argument("--model", choices=("lm", "mlm"), default="lm")
    parser.add_argument(
        "--d_model", type=int, default=MODEL.d_model, help="width (d_ff = 4 d_model, 4 heads)"
    )
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated names")
    parser.add_argument("--out", default=None, help="JSON file for the per-layer results")
    parser.add_argument("--figdir", default="experiments/figures")
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (Shakespeare)")
    parser.add_argument(
        "--seeds", type=int, default=1, help="init seeds; > 1 adds the seed-mean comparison"
    )
    parser.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="hidden and attention dropout, measured in training mode (the authors': 0.1)",
    )
    args = parser.parse_args()
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must lie in [0, 1), got {args.dropout}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    check_width(parser, args.d_model)
    names = [n for n in args.schemes.split(",") if n]
    unknown = sorted(set(names) - set(SCHEMES))
    if unknown:
        parser.error(f"unknown scheme(s) {', '.join(unknown)}; accepted: {', '.join(SCHEMES)}")

    from deepscale_jax.data import prepare_shakespeare

    prepare_shakespeare(args.data_dir)
    tokens, targets = text_batch(16, MODEL.max_len, args.data_dir)
    results, ensembles = [], []
    for scheme, norm, placement in variants(names):
        start = time.perf_counter()
        runs = [
            run_variant(
                scheme,
                norm,
                placement,
                args.layers,
                tokens,
                targets,
                args.model,
                seed,
                args.d_model,
                args.dropout,
            )
            for seed in range(args.seeds)
        ]
        results.append(runs[0])
        print(f"  {scheme} {placement}: {time.perf_counter() - start:.0f} s", flush=True)
        if args.seeds > 1:
            ensemble = seed_ensemble(runs, ENSEMBLE_QUANTITIES)
            ensemble = {"scheme": scheme, "norm": norm, **ensemble}
            ensembles.append({**ensemble, **ensemble_laws(ensemble)})
    print(format_table(results))
    if ensembles:
        print(format_ensembles(ensembles))
    os.makedirs(args.figdir, exist_ok=True)
    suffix = (
        ("" if args.model == "lm" else f"_{args.model}")
        + ("" if args.d_model == MODEL.d_model else f"_d{args.d_model}")
        + ("" if args.dropout == 0 else f"_p{args.dropout:g}")
    )
    path = os.path.join(args.figdir, f"init_moments_{args.layers}l{suffix}.png")
    plot([(r, run_curves(r)) for r in results], path)
    print(f"figure: {path}")
    if ensembles:
        path = os.path.join(args.figdir, f"init_moments_{args.layers}l{suffix}_seeds.png")
        plot([(e, ensemble_curves(e)) for e in ensembles], path)
        print(f"figure, {args.seeds}-seed geometric means: {path}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            record = {"seed_0": results, "ensembles": ensembles} if ensembles else results
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
