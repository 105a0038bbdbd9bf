"""The cure and the diagnosis (issue 4), on the real LM at init and in the theory.

24 layers, d=128, 16 x 128 bytes of Shakespeare (experiments/init_moments.py at a depth the
default suite can afford; the 96- and 192-layer figures are in experiments/README.md).
"""

import numpy as np
import pytest

from experiments import init_moments

# 12-seed geometric mean of the measured Xavier Post-LN last/first weight-gradient ratio, 24
# layers, d = 128 (seeds 0-11; experiments/README.md)
TYPICAL_POST_LN_RATIO_24L = 2.19


@pytest.fixture(scope="module")
def text(data_dir):
    from experiments.signal_propagation import text_batch

    return text_batch(16, 128, data_dir)


@pytest.fixture(scope="module")
def runs(text):
    """(scheme, placement) -> its run, each built on first use: a test builds only the models it
    reads, so xdist workers do not each build all four (~20 s each)."""
    tokens, targets = text
    built = {}

    def run(scheme: str, placement: str) -> dict:
        if (scheme, placement) not in built:
            built[scheme, placement] = init_moments.run_variant(
                scheme, "layer_norm", placement, 24, tokens, targets
            )
        return built[scheme, placement]

    return run


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_dslm_keeps_unit_variance_and_flat_weight_gradients(runs, placement):
    """DeepScaleLM: forward variance in [0.8, 1.25] at every layer and per-layer weight-gradient
    norms within a factor 2, measured and predicted; the prediction within 10% (variance) and
    25% (weight-gradient norm) at every layer."""
    result = runs("dslm", placement)
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
