"""The scheme section of the config: every scheme's options, overridable in any order, and
each scheme trains from the command line."""

import os
import subprocess
import sys

import pytest

from configs import lm
from deepscale_jax.schemes import SCHEMES, scheme_option_defaults, scheme_options
from deepscale_jax.validation import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Model settings each scheme needs (its validation names them otherwise).
NEEDS = {"deepnorm": ",placement=post", "t_fixup": ",norm=none", "rezero": ",norm=none"}


def test_section_lists_every_schemes_options():
    config = lm.get_config("smoke")
    for name in SCHEMES:
        for option, default in scheme_options(name).items():
            assert config.scheme[option] == default
    assert set(config.scheme) == {"name", *scheme_option_defaults()}


@pytest.mark.parametrize("arg", ["smoke,scheme=dslm,scheme.k=3", "smoke,scheme.k=3,scheme=dslm"])
def test_option_override_in_any_order(arg):
    _, scheme = validate_config(lm.get_config(arg))
    assert scheme.name == "dslm" and scheme.k == 3.0
    assert scheme.residual(0)[1] ** 2 == pytest.approx(3 / 4)  # smoke: 2 layers, 4 merges


def test_option_of_another_scheme_is_named():
    with pytest.raises(ValueError, match=r"scheme 'xavier' takes no option\(s\) scheme.k"):
        validate_config(lm.get_config("smoke,scheme.k=3"))


def test_scheme_model_mismatch_is_named():
    with pytest.raises(ValueError, match=r"scheme 'rezero' needs model.norm in \(none\)"):
        validate_config(lm.get_config("smoke,scheme=rezero"))


def _main(*args):
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    return subprocess.run(
        [sys.executable, "-m", "deepscale_jax.main", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # ~15 s CLI run; option parsing is tested in-process above
def test_cli_trains_dslm_with_an_option_override(data_dir, tmp_path):
    result = _main(
        "--config=configs/lm.py:smoke,scheme=dslm",
        "--config.scheme.k=3",
        f"--config.data.data_dir={data_dir}",
        f"--workdir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "final validation" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in SCHEMES if n != "dslm"])
def test_cli_trains_every_scheme(name, data_dir, tmp_path):
    result = _main(
        f"--config=configs/lm.py:smoke,scheme={name}{NEEDS.get(name, '')}",
        f"--config.data.data_dir={data_dir}",
        f"--workdir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "final validation" in result.stdout


def test_dslm_r0_measured_from_the_training_data(data_dir):
    """scheme.r0_from_data=True: the task reads a training batch and the model's scheme carries
    the measured r0 (not the authors' 0.221)."""
    from deepscale_jax.tasks import build_task

    config = lm.get_config("smoke,scheme=dslm,scheme.r0_from_data=True")
    config.data.data_dir = data_dir
    model, scheme = validate_config(config)
    task = build_task(config, model, scheme)
    assert not task.model.scheme.r0_from_data
    assert 0.0 < task.model.scheme.r0 < 1.0 and task.model.scheme.r0 != 0.221
