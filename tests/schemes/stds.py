"""Measure every weight's std in the real DecoderLM and compare with a scheme's formula.

`check_scheme_stds(name, expected, ...)` initialises the LM scanned and unrolled at depth 4,
scanned at depth 48 (unrolled at 48 with `unrolled_48=True`: slow, ~1 min), and checks:
- each layer's weight of each role has std expected(role, layer, cfg) within 5% and mean ~0;
- scanned == unrolled, every parameter bit for bit.
Inits are cached per (scheme, config), so the tests of one module share them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import numpy as np
import pytest

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.models.lm import DecoderLM
from deepscale_jax.nn.stack import per_layer_params
from deepscale_jax.schemes import build_scheme
from tests.helpers import init_params, tokens, unstack_model

BASE = ModelConfig(
    vocab_size=256,
    num_layers=4,
    d_model=64,
    num_heads=4,
    d_ff=192,
    max_len=32,
    dropout=0.1,
    tie_embeddings=False,
)
LAYER_PATHS = {
    "q": ("attn", "q"),
    "k": ("attn", "k"),
    "v": ("attn", "v"),
    "attn_out": ("attn", "attn_out"),
    "ffn_in": ("ffn", "ffn_in"),
    "ffn_out": ("ffn", "ffn_out"),
}
Expected = Callable[[str, int | None, ModelConfig], float]


def lm_config(depth: int, scan: bool = True, **overrides) -> ModelConfig:
    return dataclasses.replace(BASE, num_layers=depth, scan_layers=scan, **overrides)


@functools.lru_cache(maxsize=16)
def lm_params(name: str, cfg: ModelConfig, options: tuple = ()) -> dict:
    """Initial params of the LM with scheme `name` (numpy leaves)."""
    model = DecoderLM(cfg, build_scheme({"name": name, **dict(options)}, cfg))
    params = init_params(model, tokens(length=8, vocab=cfg.vocab_size))
    return jax.tree.map(np.asarray, params)


def weights_by_role(
    params: dict, cfg: ModelConfig
) -> dict[str, list[tuple[int | None, np.ndarray]]]:
    """role -> [(layer, weight)]: one entry per layer for layer roles, layer None outside."""
    out = {
        "embed": [(None, params["embed"]["embedding"])],
        "head": [(None, params["head"]["kernel"])],
    }
    if cfg.position_embedding == "learned":
        out["pos_embed"] = [(None, params["pos_embed"]["embedding"])]
    layers = per_layer_params(params["decoder"], cfg.num_layers)
    for role, (block, name) in LAYER_PATHS.items():
        out[role] = [(i, layer[block][name]["kernel"]) for i, layer in enumerate(layers)]
    return out


def assert_stds(params: dict, cfg: ModelConfig, expected: Expected, rel: float = 0.05) -> None:
    for role, entries in weights_by_role(params, cfg).items():
        for layer, w in entries:
            want = expected(role, layer, cfg)
            assert np.std(w) == pytest.approx(want, rel=rel), (role, layer)
            assert abs(np.mean(w)) < 0.1 * want, (role, layer)  # 6 standard errors


def assert_same(scanned: dict, unrolled: dict, depth: int) -> None:
    converted = unstack_model(scanned, depth)
    assert jax.tree.structure(converted) == jax.tree.structure(unrolled)
    for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(unrolled), strict=True):
        np.testing.assert_array_equal(a, b)


def check_scheme_stds(
    name: str, expected: Expected, depth: int, unrolled: bool, options: tuple = (), **overrides
) -> None:
    """Measured stds == formula for the scanned (and, if `unrolled`, the unrolled) LM at
    `depth`, and the two layouts' parameters identical."""
    scanned = lm_params(name, lm_config(depth, True, **overrides), options)
    assert_stds(scanned, lm_config(depth, True, **overrides), expected)
    if unrolled:
        flat = lm_params(name, lm_config(depth, False, **overrides), options)
        assert_stds(flat, lm_config(depth, False, **overrides), expected)
        assert_same(scanned, flat, depth)


def glorot(fan_in: int, fan_out: int) -> float:
    return float(np.sqrt(2.0 / (fan_in + fan_out)))


def fans(role: str, cfg: ModelConfig) -> tuple[int, int]:
    """The flattened 2-D fans (written out here independently of schemes/base.py)."""
    d = cfg.d_model
    return {"ffn_in": (d, cfg.d_ff), "ffn_out": (cfg.d_ff, d), "head": (d, cfg.vocab_size)}.get(
        role, (d, d)
    )


# depth 4 scanned + unrolled, depth 48 scanned; depth 48 unrolled is slow.
DEPTH_CASES = [
    pytest.param(4, True, id="depth4-scan+unrolled"),
    pytest.param(48, False, id="depth48-scan"),
    pytest.param(48, True, id="depth48-scan+unrolled", marks=pytest.mark.slow),
]
