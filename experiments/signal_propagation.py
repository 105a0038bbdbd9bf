r"""Signal propagation: closed-form moments vs Monte Carlo on the real modules and models.

    python -m experiments.signal_propagation --out experiments/results/signal_propagation.json
    python -m experiments.signal_propagation --full      # the authors' grids (slow)

1. Components: every component of theory/components.py and theory/attention.py is swept over a
   grid of input moments and shapes; each configuration is measured on the real nn/ module
   (forward + jax.vjp) and compared with the formula in the authors' error metric (Kedia et al.
   2024, `calc_err`). Printed and written (--out): 50th / 90th / 99th percentile errors (%) per
   component and statistic, next to the authors' figures.
2. Whole model: a deep decoder LM (xavier, Pre-LN and Post-LN) at initialization on Shakespeare
   text; per-layer residual-stream variance, correlation and gradient variance, predicted
   (theory/model.py) and measured; figure written to --figdir. With `--seeds K`, also the
   geometric means over K init seeds (`seed_ensemble`): one model is one random draw, and
   the theory predicts the typical model. `--model mlm --dropout 0.1`: the same for the
   authors' setting, the bidirectional masked-LM encoder with dropout 0.1 in training mode.

    python -m experiments.signal_propagation --skip_components --seeds 8 --d_model 256 \
        --model mlm --dropout 0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import flax.linen as nn
import jax
import numpy as np

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models.lm import DecoderLM
from deepscale_jax.schemes import build_scheme
from deepscale_jax.theory import attention_sweeps, component_sweeps
from deepscale_jax.theory.measure import AUTHORS_PERCENTILES, case_errors, percentiles
from deepscale_jax.theory.model import Profile
from deepscale_jax.theory.model_measure import (
    gradient_step_decomposition,
    max_relative_error,
    predicted_and_measured,
)

SWEEPS = (component_sweeps, attention_sweeps)


def errors_of(module, case, measured: dict, predicted: dict) -> dict[str, float]:
    """The authors' errors for one case, with the sweep module's own scoring rules."""
    if hasattr(module, "case_errors_for"):
        return module.case_errors_for(case, measured, predicted)
    plain = module.plain_relative_statistics(case.component)
    return case_errors(measured, predicted, plain)


def sweep_components(full: bool, seed: int = 0) -> list[dict]:
    """Measures every case of every sweep; returns one row per (component, statistic)."""
    errors: dict[tuple[str, str], list[float]] = {}
    key = jax.random.PRNGKey(seed)
    for module in SWEEPS:
        for index, case in enumerate(module.cases(full=full)):
            measured = case.measure(jax.random.fold_in(key, index))
            predicted = case.predict()
            errs = errors_of(module, case, measured, predicted)
            for statistic, err in errs.items():
                errors.setdefault((case.component, statistic), []).append(err)
    rows = []
    for (component, statistic), errs in errors.items():
        p50, p90, p99 = percentiles(errs)
        authors = AUTHORS_PERCENTILES.get(component, {}).get(statistic)
        rows.append(
            {
                "component": component,
                "statistic": statistic,
                "p50": p50,
                "p90": p90,
                "p99": p99,
                "configs": len(errs),
                "authors": list(authors) if authors else None,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        f"{'component':<10} {'statistic':<13} {'n':>5}  {'p50':>6} {'p90':>6} {'p99':>6}"
        "   authors p50/p90/p99"
    ]
    for row in rows:
        authors = "/".join(f"{v:.1f}" for v in row["authors"]) if row["authors"] else "-"
        lines.append(
            f"{row['component']:<10} {row['statistic']:<13} {row['configs']:>5}  "
            f"{row['p50']:6.1f} {row['p90']:6.1f} {row['p99']:6.1f}   {authors}"
        )
    return "\n".join(lines)


def text_batch(batch: int, seq_len: int, data_dir: str | None) -> tuple[jax.Array, jax.Array]:
    """A batch of Shakespeare validation text (inputs, targets)."""
    from ml_collections import ConfigDict

    from deepscale_jax.data import make_lm_iterator

    it = make_lm_iterator(
        ConfigDict({"name": "shakespeare", "data_dir": data_dir}),
        split="validation",
        seq_len=seq_len,
        global_batch_size=batch,
        seed=0,
        shuffle=False,
        repeat=False,
    )
    first = next(iter(it))
    return jax.numpy.asarray(first["inputs"]), jax.numpy.asarray(first["targets"])


MODEL = ModelConfig(num_layers=48, d_model=128, num_heads=4, d_ff=512, max_len=128)


def check_width(parser: argparse.ArgumentParser, d_model: int) -> None:
    """--d_model must split into MODEL's heads."""
    if d_model < MODEL.num_heads or d_model % MODEL.num_heads:
        parser.error(f"--d_model must be a positive multiple of {MODEL.num_heads}, got {d_model}")


def model_config(layers: int, placement: str, d_model: int = MODEL.d_model) -> ModelConfig:
    """MODEL at `layers` and width `d_model` (d_ff = 4 d_model, 4 heads)."""
    return dataclasses.replace(
        MODEL, num_layers=layers, norm_placement=placement, d_model=d_model, d_ff=4 * d_model
    )


DROPOUT_SEED_OFFSET = 1000  # the masks' key: init seed + this, apart from the init keys


def mlm_batch(tokens: jax.Array, seed: int = 0) -> dict[str, jax.Array]:
    """The masked-LM view of a text batch (data/mlm.py masking: 15%, 80/10/10)."""
    from deepscale_jax.data.mlm import MASK_ID, MaskingRates, mask_row

    rng = np.random.default_rng(seed)
    rows = [mask_row(np.asarray(row), rng, MaskingRates()) for row in tokens]
    batch = {k: np.stack([row[k] for row in rows]) for k in ("inputs", "targets", "weights")}
    assert batch["inputs"].max() <= MASK_ID
    return {k: jax.numpy.asarray(v) for k, v in batch.items()}


def lm_at_init(
    layers: int,
    placement: str,
    tokens: jax.Array,
    targets: jax.Array,
    scheme: str = "xavier",
    norm: str = "layer_norm",
    model_kind: str = "lm",
    seed: int = 0,
    d_model: int = MODEL.d_model,
    dropout: float = 0.0,
) -> tuple[nn.Module, Profile, Profile]:
    """(model, predicted, measured): the per-layer moments of one LM at init
    (`predicted_and_measured`). The LM is MODEL at `layers` and width `d_model` (d_ff =
    4 d_model): the causal decoder LM on
    (tokens, targets) or, `model_kind` "mlm", the bidirectional encoder with the masked-LM loss
    on `mlm_batch(tokens)`. `dropout` > 0: hidden and attention dropout at that rate, measured
    in training mode on one draw of the masks (the authors' setting, p = 0.1; theory.md 2.7),
    which the schemes' init and the theory both take in."""
    from deepscale_jax.data.mlm import VOCAB_SIZE
    from deepscale_jax.models.mlm import EncoderMLM

    cfg = dataclasses.replace(
        model_config(layers, placement, d_model), norm=norm, dropout=dropout, attn_dropout=dropout
    )
    weights = None
    if model_kind == "mlm":
        cfg = dataclasses.replace(cfg, architecture="encoder_only", vocab_size=VOCAB_SIZE)
        batch = mlm_batch(tokens)
        tokens, targets, weights = batch["inputs"], batch["targets"], batch["weights"]
    elif model_kind != "lm":
        raise ValueError(f"model_kind must be 'lm' or 'mlm', got {model_kind!r}")
    model_cls = EncoderMLM if model_kind == "mlm" else DecoderLM
    model = model_cls(cfg, build_scheme({"name": scheme}, cfg))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), tokens))["params"]
    dropout_rng = jax.random.PRNGKey(DROPOUT_SEED_OFFSET + seed) if dropout > 0 else None
    return model, *predicted_and_measured(model, params, tokens, targets, weights, dropout_rng)


def whole_model(
    layers: int,
    placement: str,
    tokens: jax.Array,
    targets: jax.Array,
    scheme: str = "xavier",
    seed: int = 0,
    d_model: int = MODEL.d_model,
    model_kind: str = "lm",
    dropout: float = 0.0,
) -> dict:
    """Predicted and measured per-layer profiles of one LM at init (`lm_at_init`), with the
    max relative errors over layers."""
    model, predicted, measured = lm_at_init(
        layers,
        placement,
        tokens,
        targets,
        scheme,
        model_kind=model_kind,
        seed=seed,
        d_model=d_model,
        dropout=dropout,
    )
    return {
        "placement": placement,
        "scheme": scheme,
        "model": model_kind,
        "dropout": dropout,
        "layers": layers,
        "d_model": d_model,
        "seed": seed,
        "predicted": predicted.to_json(),
        "measured": measured.to_json(),
        "max_rel_error_var": max_relative_error(predicted.var, measured.var),
        "max_rel_error_grad_var": max_relative_error(predicted.grad_var, measured.grad_var),
        "max_rel_error_grad_var_above_2": max_relative_error(
            predicted.grad_var[2:], measured.grad_var[2:]
        ),
        "max_rel_error_weight_grad_norm": max_relative_error(
            predicted.weight_grad_norm, measured.weight_grad_norm
        ),
        "max_rel_error_cross": max_relative_error(predicted.cross[1:], measured.cross[1:]),
        "gradient_steps": {
            name: values.tolist()
            for name, values in gradient_step_decomposition(
                model, tokens, predicted, measured
            ).items()
        },
        "token_groups": {
            kind: token_group_profile(profile.grad_var_by_position)
            for kind, profile in (("predicted", predicted), ("measured", measured))
        },
    }


ENSEMBLE_QUANTITIES = ("var", "grad_var", "weight_grad_norm", "cross")
ARITHMETIC = {"corr"}  # averaged plainly; the scale quantities spread multiplicatively


def seed_ensemble(results: list[dict], quantities: tuple[str, ...] = ENSEMBLE_QUANTITIES) -> dict:
    """Means over init seeds of the measured and the predicted per-layer curves (results of
    one model variant, each with "seed", "measured" and "predicted"), the max relative error
    between them, each seed's own max error, the measured per-layer range and, for the scale
    quantities, the per-layer standard error of the geometric mean's log error (the seeds'
    standard deviation of log(predicted/measured) over sqrt(seeds)). Geometric means
    for the scale quantities: one Post-LN model's gradient is a product of ~2N random
    per-sublayer gains (log-sd ~1.3 over 48 layers at d = 128, experiments/README.md), so the
    theory, which predicts the typical model, is compared with the typical measured model."""

    out: dict = {"placement": results[0]["placement"], "seeds": [r["seed"] for r in results]}
    for quantity in quantities:
        measured, predicted = (
            np.asarray([r[kind][quantity] for r in results], dtype=float)
            for kind in ("measured", "predicted")
        )
        if quantity not in ARITHMETIC and np.any(measured <= 0):
            out[quantity] = None  # nothing to compare (ReZero's gated weights get no gradient)
            continue
        mean = (
            (lambda c: c.mean(axis=0))
            if quantity in ARITHMETIC
            else (lambda c: np.exp(np.log(c).mean(axis=0)))
        )
        out[quantity] = {
            "measured": mean(measured).tolist(),
            "predicted": mean(predicted).tolist(),
            "max_rel_error": max_relative_error(mean(predicted), mean(measured)),
            "per_seed_max_rel_error": [
                max_relative_error(p, m) for p, m in zip(predicted, measured, strict=True)
            ],
            "measured_min": measured.min(axis=0).tolist(),
            "measured_max": measured.max(axis=0).tolist(),
            "log_error_standard_error": (
                None
                if quantity in ARITHMETIC or len(results) < 2
                else (
                    np.log(predicted / measured).std(axis=0, ddof=1) / np.sqrt(len(results))
                ).tolist()
            ),
        }
    return out


def step_summary(results: list[dict]) -> dict[str, float]:
    """Over init seeds (results of one model variant): the mean and the standard error of
    the sums over layers of the gradient decomposition's two parts (`whole_model`'s
    "gradient_steps", model_measure.gradient_step_decomposition), whose sum is the
    prediction's log error at the stack input: "map_error" (each layer's map fed the measured
    state above it) and "state_term" (the predicted state's drift); and the mean gradient
    correlation between tokens over the middle layers (N/4..3N/4), measured and predicted by
    one layer's map from the measured state. Standard errors are None for one seed."""
    out: dict[str, float] = {}
    for part in ("map_error", "state_term"):
        sums = np.asarray([np.sum(r["gradient_steps"][part]) for r in results])
        out[part] = float(sums.mean())
        out[f"{part}_standard_error"] = (
            float(sums.std(ddof=1) / np.sqrt(len(sums))) if len(sums) > 1 else None
        )
    layers = results[0]["layers"]
    middle = slice(layers // 4, 3 * layers // 4)
    for name in ("grad_corr_measured", "grad_corr_step"):
        out[name] = float(np.mean([r["gradient_steps"][name][middle] for r in results]))
    return out


def format_step_summary(placement: str, seeds: int, steps: dict[str, float]) -> str:
    """One line of `step_summary`'s figures for one placement."""

    def error(part: str) -> str:
        value = steps[f"{part}_standard_error"]
        return "" if value is None else f" (standard error {value:.3f})"

    return (
        f"{placement}-LN gradient variance at the input, log error over {seeds} seed(s) = "
        f"maps fed the measured state {steps['map_error']:+.3f}{error('map_error')} + the "
        f"predicted state's drift {steps['state_term']:+.3f}{error('state_term')}; gradient "
        f"correlation, middle layers: measured {steps['grad_corr_measured']:.3f}, one layer's "
        f"map {steps['grad_corr_step']:.3f}"
    )


def plot_ensembles(ensembles: list[dict], layers: int, path: str) -> None:
    """Per placement: geometric-mean measured (with the per-seed range) and predicted
    gradient variance and weight-gradient norms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(ensembles), 2, figsize=(11, 4 * len(ensembles)), squeeze=False)
    for row, ensemble in zip(axes, ensembles, strict=True):
        for ax, (name, title, first) in zip(
            row,
            [("grad_var", "gradient variance", 0), ("weight_grad_norm", "weight-gradient norm", 1)],
            strict=True,
        ):
            curves = ensemble[name]
            x = np.arange(first, layers + 1)
            ax.fill_between(
                x, curves["measured_min"], curves["measured_max"], alpha=0.25, label="seed range"
            )
            ax.plot(x, curves["measured"], "o", ms=3, label="measured, geometric mean")
            ax.plot(x, curves["predicted"], "-", label="predicted, geometric mean")
            ax.set_title(
                f"{ensemble['placement']}-LN, {len(ensemble['seeds'])} seeds: {title} "
                f"(max error {100 * curves['max_rel_error']:.0f}%)"
            )
            ax.set_xlabel("layer")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def token_group_profile(by_position: np.ndarray) -> dict[str, list[float]]:
    """Per-layer gradient variance of token 0, token 1 and the second half of the sequence."""
    half = by_position.shape[1] // 2
    return {
        "token 0": by_position[:, 0].tolist(),
        "token 1": by_position[:, 1].tolist(),
        "tokens L/2..L": by_position[:, half:].mean(axis=1).tolist(),
    }


def plot_whole_model(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 5, figsize=(25, 4 * len(results)), squeeze=False)
    for row, result in zip(axes, results, strict=True):
        layers = np.arange(result["layers"] + 1)
        panels = [
            ("var", "residual variance", False),
            ("corr", "inter-token correlation", False),
            ("grad_var", "gradient variance", True),
        ]
        for ax, (name, title, log) in zip(row[:3], panels, strict=True):
            ax.plot(layers, result["measured"][name], "o", ms=3, label="measured")
            ax.plot(layers, result["predicted"][name], "-", label="predicted")
            ax.set_title(f"{result['scheme']} {result['placement']}-LN: {title}")
            ax.set_xlabel("layer")
            if log:
                ax.set_yscale("log")
            ax.legend()
        ax = row[4]
        for kind, style in (("measured", "o"), ("predicted", "-")):
            ax.plot(layers[1:], result[kind]["weight_grad_norm"], style, ms=3, label=kind)
        ax.set_title(f"{result['placement']}-LN: weight-gradient norm per layer")
        ax.set_xlabel("layer")
        ax.set_yscale("log")
        ax.legend()
        ax = row[3]
        groups = result["token_groups"]
        for (name, values), color in zip(groups["measured"].items(), "bgr", strict=True):
            ax.plot(layers, values, "o", ms=3, color=color, label=f"{name} measured")
            ax.plot(layers, groups["predicted"][name], "-", color=color, label="predicted")
        ax.set_title(f"{result['placement']}-LN: gradient variance by token position")
        ax.set_xlabel("layer")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the authors' full grids (slow)")
    parser.add_argument("--out", default=None, help="JSON file for the percentile table")
    parser.add_argument("--figdir", default="experiments/figures")
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument(
        "--d_model", type=int, default=MODEL.d_model, help="width (d_ff = 4 d_model, 4 heads)"
    )
    parser.add_argument("--data_dir", default=None, help="TFDS data dir (Shakespeare)")
    parser.add_argument("--skip_components", action="store_true")
    parser.add_argument("--skip_model", action="store_true")
    parser.add_argument(
        "--seeds", type=int, default=1, help="init seeds for the whole model (geometric means)"
    )
    parser.add_argument(
        "--model",
        choices=("lm", "mlm"),
        default="lm",
        help="whole model: the causal byte LM, or the bidirectional masked-LM encoder",
    )
    parser.add_argument(
        "--dropout",
        type=float,
        default=0.0,
        help="whole model: hidden and attention dropout, in training mode (the authors': 0.1)",
    )
    args = parser.parse_args()
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must lie in [0, 1), got {args.dropout}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    check_width(parser, args.d_model)

    if not args.skip_components:
        start = time.perf_counter()
        rows = sweep_components(args.full)
        print(format_table(rows))
        print(f"(component sweeps: {time.perf_counter() - start:.0f} s)")
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
    if not args.skip_model:
        from deepscale_jax.data import prepare_shakespeare

        prepare_shakespeare(args.data_dir)
        tokens, targets = text_batch(16, MODEL.max_len, args.data_dir)
        runs = {
            p: [
                whole_model(
                    args.layers,
                    p,
                    tokens,
                    targets,
                    seed=s,
                    d_model=args.d_model,
                    model_kind=args.model,
                    dropout=args.dropout,
                )
                for s in range(args.seeds)
            ]
            for p in ("pre", "post")
        }
        results = [seeds[0] for seeds in runs.values()]
        os.makedirs(args.figdir, exist_ok=True)
        stem = (
            f"signal_propagation_{args.layers}l"
            + ("" if args.model == "lm" else f"_{args.model}")
            + ("" if args.d_model == MODEL.d_model else f"_d{args.d_model}")
            + ("" if args.dropout == 0 else f"_p{args.dropout:g}")
        )
        path = os.path.join(args.figdir, f"{stem}.png")
        plot_whole_model(results, path)
        for r in results:
            print(
                f"{r['scheme']} {r['placement']}-LN, {r['layers']} layers: max error "
                f"forward var {100 * r['max_rel_error_var']:.1f}%, "
                f"gradient var {100 * r['max_rel_error_grad_var']:.1f}% "
                f"({100 * r['max_rel_error_grad_var_above_2']:.1f}% from layer 2 up), "
                f"weight-gradient norm {100 * r['max_rel_error_weight_grad_norm']:.1f}%, "
                f"covariance between sequences {100 * r['max_rel_error_cross']:.1f}%"
            )
        record = {"seed_0": results}
        for placement, seeds in runs.items():
            steps = step_summary(seeds)
            print(format_step_summary(placement, len(seeds), steps))
            record[f"gradient_steps_{placement}"] = steps
        if args.seeds > 1:
            ensembles = [seed_ensemble(seeds) for seeds in runs.values()]
            for e in ensembles:
                print(
                    f"{e['placement']}-LN, geometric mean over {len(e['seeds'])} seeds: max error "
                    + ", ".join(
                        f"{q} {100 * e[q]['max_rel_error']:.1f}% (per seed "
                        f"{100 * min(e[q]['per_seed_max_rel_error']):.0f}"
                        f"-{100 * max(e[q]['per_seed_max_rel_error']):.0f}%; standard error "
                        f"of the log up to {max(e[q]['log_error_standard_error']):.2f})"
                        for q in ENSEMBLE_QUANTITIES
                        if e[q] is not None  # a quantity with non-positive values: no geomean
                    )
                )
            seeds_path = os.path.join(args.figdir, f"{stem}_seeds.png")
            plot_ensembles(ensembles, args.layers, seeds_path)
            record["ensembles"] = ensembles
            print(f"figure: {seeds_path}")
        with open(os.path.join(args.figdir, f"{stem}.json"), "w") as f:
            json.dump(record, f, indent=1)
        print(f"figure: {path}")


if __name__ == "__main__":
    main()
