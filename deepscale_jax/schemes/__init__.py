"""Init and residual-scaling schemes behind a registry by name (`scheme.name`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.schemes.base import LAYER_ROLES, ROLES, Scheme
from deepscale_jax.schemes.default import DefaultScheme
from deepscale_jax.schemes.xavier import XavierScheme

SCHEMES: dict[str, type[Scheme]] = {cls.name: cls for cls in (XavierScheme, DefaultScheme)}


def build_scheme(scheme_config: Mapping[str, Any], model: ModelConfig) -> Scheme:
    """The scheme `scheme_config["name"]` for `model`; the section's other fields are options.

    Raises ValueError naming an unknown scheme or an option the scheme does not take.
    """
    options = dict(scheme_config)
    name = options.pop("name", None)
    if name not in SCHEMES:
        raise ValueError(f"unknown scheme.name={name!r}; accepted: {', '.join(SCHEMES)}")
    cls = SCHEMES[name]
    accepted = {f.name for f in dataclasses.fields(cls)} - {"model"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"scheme {name!r} takes no option(s) scheme.{', scheme.'.join(unknown)}; "
            f"accepted: {', '.join(sorted(accepted)) or 'none'}"
        )
    return cls(model=model, **options)


__all__ = ["LAYER_ROLES", "ROLES", "SCHEMES", "Scheme", "build_scheme"]
