"""Configs: presets, overrides, and a clear error for each bad input."""

import pytest

from configs import lm
from deepscale_jax.validation import check_workdir, validate_config


def test_presets_and_overrides():
    config = lm.get_config("smoke,layers=5,scheme=default,model.norm=rms_norm,lr=0.01")
    assert config.preset == "smoke"
    assert config.model.num_layers == 5
    assert config.scheme.name == "default"
    assert config.model.norm == "rms_norm"
    assert config.optim.learning_rate == 0.01
    model, scheme = validate_config(config)
    assert model.num_layers == 5 and scheme.name == "default"


def test_default_preset_is_deep_and_scanned():
    model, _ = validate_config(lm.get_config())
    assert model.num_layers >= 24 and model.scan_layers


def test_deep_preset_has_192_layers():
    model, _ = validate_config(lm.get_config("deep"))
    assert model.num_layers == 192


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("smoke,heads=3", r"model.num_heads=3 does not divide model.d_model=32"),
        ("smoke,scheme=bogus", r"unknown scheme.name='bogus'; accepted: xavier, default"),
        ("smoke,norm=batch_norm", r"unknown model.norm='batch_norm'; accepted: layer_norm"),
        ("smoke,layers=0", r"model.num_layers=0 must be a positive integer"),
        ("smoke,layers=-4", r"model.num_layers=-4 must be a positive integer"),
        ("smoke,seq=65", r"train.seq_len=65 is longer than the position table model.max_len=64"),
        ("smoke,placement=middle", r"unknown model.norm_placement='middle'; accepted: pre, post"),
        ("smoke,remat=some", r"unknown model.remat_policy='some'; accepted: none, full"),
        ("smoke,model.activation=tanh", r"unknown model.activation='tanh'; accepted: relu, gelu"),
        ("smoke,model.dropout=1.5", r"model.dropout=1.5 must lie in \[0, 1\)"),
        ("smoke,optim.schedule=step", r"unknown optim.schedule='step'"),
        ("smoke,steps=0", r"train.num_steps=0 must be a positive integer"),
        ("smoke,ckpt.every_steps=0", r"ckpt.every_steps=0 must be a positive integer"),
    ],
)
def test_bad_config_names_the_field(arg, message):
    with pytest.raises(ValueError, match=message):
        validate_config(lm.get_config(arg))


def test_scheme_option_unknown():
    config = lm.get_config("smoke")
    config.scheme.gain = 2.0
    with pytest.raises(ValueError, match=r"scheme 'xavier' takes no option\(s\) scheme.gain"):
        validate_config(config)


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("smoke,nonsense=3", r"unknown config field 'nonsense'"),
        ("smoke,model.widht=3", r"unknown config field 'model.widht'; fields of that section"),
        ("smoke,layers=many", r"bad value for model.num_layers"),
        ("smoke,scan=maybe", r"bad value for model.scan_layers: expected true or false"),
        ("tiny", r"unknown preset 'tiny'; accepted: smoke, default, deep"),
        ("smoke,layers", r"config argument 'layers' is not key=value"),
    ],
)
def test_bad_config_argument_names_the_problem(arg, message):
    with pytest.raises(ValueError, match=message):
        lm.get_config(arg)


def test_missing_workdir_parent(tmp_path):
    with pytest.raises(ValueError, match="parent directory .* does not exist"):
        check_workdir(str(tmp_path / "no" / "such" / "run"))
    assert check_workdir(str(tmp_path / "run")) == str(tmp_path / "run")
