"""Init and residual-scaling schemes behind a registry by name (`scheme.name`).

The config's scheme section holds `name` and every registered scheme's options at their defaults
(`scheme_option_defaults`), so any option can be overridden on the command line
(`--config.scheme.k=4`) whichever scheme a preset chose. `build_scheme` passes the chosen
scheme its own options; another scheme's option is accepted only at its default value, and a
changed one is an error naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.schemes.base import LAYER_ROLES, NON_OPTIONS, ROLES, Scheme
from deepscale_jax.schemes.deepnorm import DeepNormScheme
from deepscale_jax.schemes.default import DefaultScheme
from deepscale_jax.schemes.ds_init import DSInitScheme
from deepscale_jax.schemes.dslm import DeepScaleLMScheme
from deepscale_jax.schemes.lns import LayerNormScalingScheme
from deepscale_jax.schemes.rezero import ReZeroScheme
from deepscale_jax.schemes.t_fixup import TFixupScheme
from deepscale_jax.schemes.xavier import XavierScheme

SCHEMES: dict[str, type[Scheme]] = {
    cls.name: cls
    for cls in (
        XavierScheme,
        DefaultScheme,
        DeepScaleLMScheme,
        DSInitScheme,
        DeepNormScheme,
        TFixupScheme,
        ReZeroScheme,
        LayerNormScalingScheme,
    )
}


def scheme_options(name: str) -> dict[str, Any]:
    """The options of scheme `name` with their defaults."""
    return {
        f.name: f.default for f in dataclasses.fields(SCHEMES[name]) if f.name not in NON_OPTIONS
    }


def scheme_option_defaults() -> dict[str, Any]:
    """Every scheme's options with their defaults (an option shared by two schemes must have one
    default: checked here)."""
    union: dict[str, Any] = {}
    for name in SCHEMES:
        for option, default in scheme_options(name).items():
            if option in union and union[option] != default:
                raise AssertionError(f"scheme option {option!r} has two defaults")
            union[option] = default
    return union


def build_scheme(scheme_config: Mapping[str, Any], model: ModelConfig) -> Scheme:
    """The scheme `scheme_config["name"]` for `model`; the section's other fields are options.

    Raises ValueError naming an unknown scheme, or an option the scheme does not take (unless it
    is another scheme's option left at its default), or the scheme's own validation error.
    """
    options = dict(scheme_config)
    name = options.pop("name", None)
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme.name={name!r}; accepted: {', '.join(SCHEMES)}")
    accepted = scheme_options(name)
    others = scheme_option_defaults()
    unknown = sorted(
        key
        for key, value in options.items()
        if key not in accepted and not (key in others and others[key] == value)
    )
    if unknown:
        raise ValueError(
            f"scheme {name!r} takes no option(s) scheme.{', scheme.'.join(unknown)}; "
            f"accepted: {', '.join(sorted(accepted)) or 'none'}"
        )
    return SCHEMES[name](model=model, **{k: v for k, v in options.items() if k in accepted})


__all__ = [
    "LAYER_ROLES",
    "ROLES",
    "SCHEMES",
    "Scheme",
    "build_scheme",
    "scheme_option_defaults",
    "scheme_options",
]
