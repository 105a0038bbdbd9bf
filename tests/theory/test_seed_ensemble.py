"""experiments.signal_propagation.seed_ensemble: geometric means over init seeds, their error
and its standard error, on hand-made curves."""

import numpy as np
import pytest

from experiments.signal_propagation import seed_ensemble, step_summary


def test_geometric_means_and_the_standard_error_of_their_log_error():
    measured = [[1.0, 4.0], [4.0, 1.0], [2.0, 2.0]]
    predicted = [[2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]
    results = [
        {
            "seed": seed,
            "placement": "post",
            "measured": {"grad_var": m, "corr": [0.5, 0.7]},
            "predicted": {"grad_var": p, "corr": [0.6, 0.7]},
        }
        for seed, (m, p) in enumerate(zip(measured, predicted, strict=True))
    ]
    out = seed_ensemble(results, ("grad_var", "corr"))
    assert out["seeds"] == [0, 1, 2]
    grad = out["grad_var"]
    np.testing.assert_allclose(grad["measured"], [2.0, 2.0])  # (1 * 4 * 2)^(1/3)
    assert grad["max_rel_error"] == pytest.approx(0.0, abs=1e-12)
    assert grad["per_seed_max_rel_error"] == pytest.approx([1.0, 1.0, 0.0])
    log_errors = np.log([[2.0, 0.5], [0.5, 2.0], [1.0, 1.0]])
    expected = log_errors.std(axis=0, ddof=1) / np.sqrt(3)  # ln 2 / sqrt(3) per layer
    np.testing.assert_allclose(grad["log_error_standard_error"], expected)
    assert out["corr"]["log_error_standard_error"] is None  # averaged plainly, not in log
    assert out["corr"]["max_rel_error"] == pytest.approx(0.2)


def test_step_summary_averages_the_decomposition_over_seeds():
    """The two parts of the gradient decomposition, summed over layers, averaged over seeds
    with their standard errors; the correlations over the middle layers N/4..3N/4."""
    steps = [
        {"map_error": [0.1, 0.2, 0.0, 0.1], "state_term": [0.0, 0.1, 0.1, 0.0]},
        {"map_error": [-0.1, 0.0, 0.0, -0.1], "state_term": [0.1, 0.1, 0.1, 0.1]},
    ]
    results = [
        {
            "layers": 4,
            "gradient_steps": {
                **s,
                "grad_corr_measured": [0.0, 0.5, 0.6, 0.0, 9.0],
                "grad_corr_step": [0.0, 0.4, 0.4, 9.0],
            },
        }
        for s in steps
    ]
    out = step_summary(results)
    assert out["map_error"] == pytest.approx(0.1)  # sums 0.4 and -0.2
    assert out["map_error_standard_error"] == pytest.approx(np.std([0.4, -0.2], ddof=1) / 2**0.5)
    assert out["state_term"] == pytest.approx(0.3)
    assert out["state_term_standard_error"] == pytest.approx(np.std([0.2, 0.4], ddof=1) / 2**0.5)
    assert out["grad_corr_measured"] == pytest.approx(0.55)
    assert out["grad_corr_step"] == pytest.approx(0.4)
    one = step_summary(results[:1])
    assert one["map_error"] == pytest.approx(0.4) and one["map_error_standard_error"] is None
