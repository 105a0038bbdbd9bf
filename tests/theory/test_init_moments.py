"""The cure and the diagnosis (issue 4), on the real LM at init and in the theory.

Mostly 24 layers, d=128, 16 x 128 bytes of Shakespeare (experiments/init_moments.py at a depth
the default suite can afford); the diagnosis in the authors' setting (masked LM, dropout 0.1)
at 96 layers, its seed mean at d = 256 under `-m slow`. The figures: experiments/README.md.
"""

import numpy as np
import pytest

from experiments import init_moments
from experiments.signal_propagation import seed_ensemble

# 12-seed geometric mean of the measured Xavier Post-LN last/first weight-gradient ratio, 24
# layers, d = 128 (seeds 0-11; experiments/README.md)
TYPICAL_POST_LN_RATIO_24L = 2.19


@pytest.fixture(scope="module")
def text(data_dir):
    from experiments.signal_propagation import text_batch

    return text_batch(16, 128, data_dir)


@pytest.fixture(scope="module")
def runs(text):
    """(scheme, placement[, dropout]) -> its run, each built on first use: a test builds only the
    models it reads, so xdist workers do not each build all of them (~10-20 s each)."""
    tokens, targets = text
    built = {}

    def run(scheme: str, placement: str, dropout: float = 0.0) -> dict:
        key = scheme, placement, dropout
        if key not in built:
            built[key] = init_moments.run_variant(
                scheme, "layer_norm", placement, 24, tokens, targets, dropout=dropout
            )
        return built[key]

    return run


@pytest.mark.parametrize("placement, dropout", [("pre", 0.0), ("post", 0.0), ("pre", 0.1)])
def test_dslm_keeps_unit_variance_and_flat_weight_gradients(runs, placement, dropout):
    """DeepScaleLM: forward variance in [0.8, 1.25] at every layer and per-layer weight-gradient
    norms within a factor 2, measured and predicted; the prediction within 10% (variance) and
    25% (weight-gradient norm) at every layer. Also at the authors' dropout 0.1, measured in
    training mode, which the recipe's (1 - p) factors compensate (measured variance 0.84-0.98)."""
    result = runs("dslm", placement, dropout)
    for kind in ("measured", "predicted"):
        var = np.asarray(result[kind]["var"][1:])
        assert var.min() >= 0.8 and var.max() <= 1.25, (kind, var.min(), var.max())
        assert result[f"laws_{kind}"]["wg_max_over_min"] <= 2.0
    assert result["max_rel_error"]["var"] <= 0.10
    assert result["max_rel_error"]["weight_grad_norm"] <= 0.25


def test_xavier_pre_ln_variance_grows_with_depth(runs):
    """The diagnosis, Pre-LN: forward variance grows at least 10x from the first to the last
    layer, and the theory predicts that ratio within 25%."""
    measured = runs("xavier", "pre")["laws_measured"]["var_last_over_first"]
    predicted = runs("xavier", "pre")["laws_predicted"]["var_last_over_first"]
    assert measured >= 10.0
    assert abs(predicted / measured - 1) <= 0.25, (predicted, measured)


def test_xavier_post_ln_weight_gradients_shrink_toward_the_input(runs):
    """The diagnosis, Post-LN: per-layer weight-gradient norms shrink toward the input (last /
    first >= 5 measured at 24 layers for this seed). The theory predicts the typical model:
    its ratio (2.1x here, 1.8-2.2x over seeds) is asserted within 25% of the measured
    geometric mean over 12 init seeds, 2.19x, whose single ratios run from 0.97x to this
    seed's 5.8x (experiments/README.md)."""
    measured = runs("xavier", "post")["laws_measured"]["wg_last_over_first"]
    predicted = runs("xavier", "post")["laws_predicted"]["wg_last_over_first"]
    assert measured >= 5.0, measured
    assert abs(predicted / TYPICAL_POST_LN_RATIO_24L - 1) <= 0.25, predicted


def test_dropout_limits_the_post_ln_rank_collapse(runs):
    """Without dropout the Xavier Post-LN stream collapses (token correlation 1.000 at the top);
    with the authors' dropout 0.1 in training mode it saturates below 1 (theory.md 1.10: rank
    collapse is limited by dropout): measured 0.843, predicted 0.840 (seed 0). The prediction
    composes the dropout maps of components.py along the stack."""
    assert runs("xavier", "post")["measured"]["corr"][-1] > 0.999
    result = runs("xavier", "post", 0.1)
    measured, predicted = result["measured"]["corr"][-1], result["predicted"]["corr"][-1]
    assert measured < 0.9, measured
    assert abs(predicted - measured) <= 0.02, (predicted, measured)


def test_authors_setting_post_ln_gradients_vanish_over_96_layers(text):
    """The diagnosis in the setting of the authors' figures (theory.md 2.7): the masked-LM
    encoder with dropout 0.1 / 0.1 in training mode, 96 layers. Dropout keeps the stream
    from collapsing (r ~ 0.87), so the gradient keeps shrinking by a steady factor per layer
    instead of saturating as in the collapsed stream without dropout: last/first 66.7x
    measured for seed 0 at d = 128 (6 seeds: 6.8-67x, geometric mean 25x), 9.0x predicted.
    The theory predicts the mean over weight draws of each layer's gain; at d = 128 one
    model's per-layer gain fluctuates with a log-sd of ~0.15, whose Jensen gap (~0.01 per
    layer) is the likely reason the typical model shrinks faster. At d = 256 the prediction
    matches the seed mean (the slow test below; experiments/README.md)."""
    tokens, targets = text
    result = init_moments.run_variant(
        "xavier", "layer_norm", "post", 96, tokens, targets, "mlm", dropout=0.1
    )
    measured = result["laws_measured"]["wg_last_over_first"]
    predicted = result["laws_predicted"]["wg_last_over_first"]
    assert measured >= 5.0 and predicted >= 5.0, (measured, predicted)
    assert result["measured"]["corr"][-1] < 0.95  # not collapsed: dropout limits it


@pytest.mark.slow
def test_authors_setting_diagnosis_on_the_seed_mean(text):
    """The diagnosis of the typical model, as the issue states it: at 96 layers, d = 256, in
    the authors' setting (masked-LM encoder, dropout 0.1), the geometric mean over 8 init
    seeds of the Xavier Post-LN last/first weight-gradient ratio is at least 5x (10.0x; single
    seeds 2.5-33x), and the theory's prediction of that ratio is within 25% (9.8x). ~5 min."""
    tokens, targets = text
    runs = [
        init_moments.run_variant(
            "xavier", "layer_norm", "post", 96, tokens, targets, "mlm", s, 256, 0.1
        )
        for s in range(8)
    ]
    ensemble = seed_ensemble(runs, init_moments.ENSEMBLE_QUANTITIES)
    laws = init_moments.ensemble_laws(ensemble)
    measured = laws["laws_measured"]["wg_last_over_first"]
    predicted = laws["laws_predicted"]["wg_last_over_first"]
    assert measured >= 5.0, measured
    assert abs(predicted / measured - 1) <= 0.25, (predicted, measured)


def test_seed_mean_laws_are_the_seeds_geometric_means():
    """`ensemble_laws`: the last/first ratio of the seeds' geometric-mean curves is the
    geometric mean of the single seeds' ratios; schemes whose weights get no gradient give
    None."""
    layers = np.arange(1, 5)

    def run(seed: int, shrink: float) -> dict:
        curves = {
            "var": [0.5, *(1.0 + 0.1 * layers)],
            "corr": [0.1] * 5,
            "weight_grad_norm": list(shrink ** (layers - 4.0)),
        }
        return {"seed": seed, "placement": "post", "measured": curves, "predicted": curves}

    ensemble = seed_ensemble([run(0, 2.0), run(1, 8.0)], init_moments.ENSEMBLE_QUANTITIES)
    laws = init_moments.ensemble_laws(ensemble)["laws_measured"]
    assert laws["wg_last_over_first"] == pytest.approx(np.sqrt(2.0**3 * 8.0**3))
    assert laws["var_last_over_first"] == pytest.approx(1.4 / 1.1)
    gated = seed_ensemble(
        [{**run(0, 2.0), "measured": {**run(0, 2.0)["measured"], "weight_grad_norm": [0.0] * 4}}],
        init_moments.ENSEMBLE_QUANTITIES,
    )
    assert init_moments.ensemble_laws(gated)["laws_measured"]["wg_max_over_min"] is None


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--dropout", "1.5"], "--dropout must lie in [0, 1), got 1.5"),
        (["--seeds", "0"], "--seeds must be at least 1, got 0"),
        (["--d_model", "130"], "--d_model must be a positive multiple of 4, got 130"),
        (["--schemes", "xavier,nope"], "unknown scheme(s) nope"),
    ],
)
def test_bad_flags_are_named(monkeypatch, capsys, flags, named):
    """A bad flag stops the experiment before any model is built, naming the value."""
    monkeypatch.setattr("sys.argv", ["init_moments", *flags])
    with pytest.raises(SystemExit):
        init_moments.main()
    assert named in capsys.readouterr().err
