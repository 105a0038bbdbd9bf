"""Loss-spike detection (issue 7, part 3): per-layer gradient norms and the layer a spike
names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lm
from deepscale_jax import train as train_lib
from deepscale_jax.convert import convert_tree
from deepscale_jax.metrics import read_metrics
from deepscale_jax.spikes import SpikeDetector, layer_grad_norms
from deepscale_jax.tasks import build_task
from deepscale_jax.train import train_and_evaluate
from deepscale_jax.validation import validate_config
from tests.test_reliability import _PoisonedIterator


def _lm_grads():
    """Gradients of a 3-layer smoke LM's loss (scanned layout)."""
    config = lm.get_config("smoke,layers=3")
    model_cfg, scheme = validate_config(config)
    task = build_task(config, model_cfg, scheme)
    init = jax.jit(task.model.init)
    params = nn.meta.unbox(init(jax.random.PRNGKey(0), *task.init_inputs())["params"])
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 33), 0, 256)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    def loss(p):
        total, count = task.loss(p, batch, deterministic=True)
        return total / count

    return jax.jit(jax.grad(loss))(params)


def test_layer_norms_are_the_same_for_scanned_and_unrolled_stacks():
    scanned_grads = _lm_grads()
    unrolled_grads, _ = convert_tree(scanned_grads, scan_layers=False)
    assert "layer_002" in unrolled_grads["decoder"]
    scanned, unrolled = layer_grad_norms(scanned_grads), layer_grad_norms(unrolled_grads)
    assert set(scanned) == set(unrolled) == {"decoder"}
    assert scanned["decoder"].shape == (3,)
    np.testing.assert_allclose(scanned["decoder"], unrolled["decoder"], rtol=1e-6)


def test_layer_norms_add_every_leaf_of_a_layer():
    grads = {
        "enc": {"layers": {"w": jnp.ones((2, 3, 4)), "b": 2 * jnp.ones((2, 5))}},
        "dec": {"layer_000": {"w": jnp.ones((3,))}, "layer_001": {"w": 3 * jnp.ones((4,))}},
        "embed": jnp.ones((7, 2)),
    }
    norms = layer_grad_norms(grads)
    np.testing.assert_allclose(norms["enc"], [np.sqrt(12 + 20)] * 2, rtol=1e-6)
    np.testing.assert_allclose(norms["dec"], [np.sqrt(3), np.sqrt(36)], rtol=1e-6)
    assert "embed" not in norms


def test_detector_names_the_layer_that_jumped_and_stays_quiet_otherwise():
    detector = SpikeDetector(factor=2.0)
    calm = {"decoder": np.array([1.0, 2.0, 1.0])}
    for i in range(5):
        assert detector.update(2 * i + 1, 2 * i + 2, 3.0, 3.2, calm, calm) is None
    jumped = {"decoder": np.array([2.0, 3.0, 9.0])}  # layer 2 grew 9x, layer 0 2x
    spike = detector.update(11, 12, 4.0, 7.0, jumped, calm)
    assert spike is not None and (spike.stack, spike.layer) == ("decoder", 2)
    assert spike.ratio == pytest.approx(9.0)
    assert "loss spike in steps 11..12" in spike.message() and "decoder layer 2" in spike.message()
    # The spiking interval is not folded into the averages: the next calm interval is calm.
    assert detector.update(13, 14, 3.0, 3.1, calm, calm) is None


class _SpikedTask:
    """The task whose loss at the poisoned steps adds a large term on one layer's FFN kernel."""

    def __init__(self, task, steps, layer):
        self._task, self._steps, self._layer = task, set(steps), layer

    def __getattr__(self, name):
        return getattr(self._task, name)

    def iterator(self, split, training):
        inner = self._task.iterator(split, training)
        return _PoisonedIterator(inner, self._steps) if split == "train" else inner

    def loss(self, params, batch, **kwargs):
        batch = dict(batch)
        spike = batch.pop("poison").sum() > 0
        total, count = self._task.loss(params, batch, **kwargs)
        kernel = params["decoder"]["layers"]["ffn"]["ffn_in"]["kernel"][self._layer]
        return total + jnp.where(spike, 1e4 * count * jnp.sum(kernel**2), 0.0), count


def test_a_spike_in_one_layer_is_logged_with_that_layer(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        train_lib, "build_task", lambda *a: _SpikedTask(build_task(*a), steps={11}, layer=2)
    )
    config = lm.get_config(
        "smoke,layers=4,steps=12,train.log_every_steps=2,train.eval_every_steps=100,"
        "train.spike_factor=3.0,ckpt.every_steps=100"
    )
    config.data.data_dir = data_dir
    workdir = str(tmp_path / "run")
    train_and_evaluate(config, workdir)
    records = {r["step"]: r for r in read_metrics(workdir) if "train/loss" in r}
    assert [s for s, r in records.items() if "train/spike_layer" in r] == [12]
    assert records[12]["train/spike_layer"] == 2 and records[12]["train/spike_norm_ratio"] > 10
    out, err = capsys.readouterr()
    assert "loss spike in steps 11..12" in out + err and "decoder layer 2" in out + err
