"""Schedules and the weight-decay mask."""

import jax
import numpy as np
import pytest

from configs import lm
from deepscale_jax.optim import decay_mask, make_schedule
from tests.helpers import init_params, tiny_lm, tokens


def _optim(**kw):
    optim = lm.get_config("smoke").optim.to_dict()
    optim.update(kw)
    return optim


def test_cosine_warmup_then_decay_to_end_factor():
    s = make_schedule(_optim(learning_rate=1.0, warmup_steps=10, end_lr_factor=0.1), 110)
    np.testing.assert_allclose(
        [s(0), s(5), s(10), s(60), s(110)], [0, 0.5, 1, 0.55, 0.1], atol=1e-6
    )


def test_inverse_sqrt():
    s = make_schedule(_optim(schedule="inverse_sqrt", learning_rate=1.0, warmup_steps=4), 100)
    np.testing.assert_allclose([s(2), s(4), s(16)], [0.5, 1.0, 0.5], atol=1e-6)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown optim.schedule='step'"):
        make_schedule(_optim(schedule="step"), 10)


@pytest.mark.parametrize("scan", [True, False])
def test_decay_mask_by_name_in_both_layouts(scan):
    params = init_params(tiny_lm(scan_layers=scan), tokens())
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    for path, decayed in flat.items():
        assert decayed == ("kernel" in path or "embedding" in path), path
    assert any(flat.values()) and not all(flat.values())
