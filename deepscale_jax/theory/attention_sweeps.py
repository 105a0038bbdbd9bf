"""Verification grids for theory/attention.py, measured on the project's real attention code.

Components (statistics as in measure.STATISTICS):
- "SHA": the authors' single-head attention (theory.md 1.7, 3.1): q/k/v projections d_in -> d_k
  with the project's `nn.linear.Dense`, then `nn.attention.explicit_attention` with attention-prob
  dropout (`nn.Dropout`), no output projection. (`MultiHeadAttention` with one head cannot express
  it: its head dim equals d_in and it always applies W_o.) Gaussian equicorrelated input, measured
  with `measure.measure`; "g cov" uses plain relative error, as in the authors' `SHA.py`.
- "MHA": the project's `nn.attention.MultiHeadAttention` (W_o included, zero biases), causal
  (`causal_mask`) or bidirectional, xavier stds, attention dropout in training mode; its input is
  the output of the project's `LayerNorm` on an equicorrelated Gaussian (the regime of a decoder LM
  at init). The LayerNorm is applied with an identity Jacobian (straight-through), so `measure`
  returns the gradient with respect to the attention input.

Every run draws its own weights (params are vmapped over runs), so measurements estimate the
expectation over initializations that the theory predicts. The sampling error of a variance is
set by the shared (inter-token) components, ~sqrt(2 / (runs x min(d_in, d_k))), so runs are
chosen to make runs x min(d_in, d_k) >= 16384 for "SHA" (8192 in the full grid) and
runs x d >= 4096 for "MHA" (8192 in the full grid), capped at 4e10 flops per configuration.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import random
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepscale_jax.nn.attention import MultiHeadAttention, causal_mask, explicit_attention
from deepscale_jax.nn.initializers import Initializer, LayerInit, normal
from deepscale_jax.nn.linear import Dense
from deepscale_jax.nn.norms import LayerNorm
from deepscale_jax.theory import attention as theory
from deepscale_jax.theory.measure import Grad, Signal, measure, stats_of

_SHA_SAMPLES = 16384  # runs x output features per configuration (x mean noise ~0.6%)
_MHA_SAMPLES = 4096
_MAX_FLOPS = 4e10  # per configuration, caps the number of runs
_CHUNK_BYTES = 1.5e8  # attention-probability memory per chunk of runs


@dataclasses.dataclass(frozen=True)
class Stds:
    """A minimal scheme: `init(role, layer)` -> N(0, std^2) by role (q, k, v, attn_out)."""

    q: float
    k: float
    v: float
    attn_out: float = 1.0

    def init(self, role: str, layer: Any) -> Initializer:
        del layer
        return normal(getattr(self, role))


class SingleHeadAttention(nn.Module):
    """The authors' SHA from project parts: Dense q/k/v (d_in -> 1 x d_k) + explicit_attention."""

    d_k: int
    dropout_rate: float

    @nn.compact
    def __call__(self, x: jax.Array, init: LayerInit, deterministic: bool) -> jax.Array:
        def project(role: str) -> jax.Array:
            dense = Dense(
                (1, self.d_k),
                init.for_role(role),
                ("embed", "heads", "kv"),
                use_bias=False,
                name=role,
            )
            return dense(x)

        dropout = (
            nn.Dropout(self.dropout_rate, broadcast_dims=()) if self.dropout_rate > 0 else None
        )
        out = explicit_attention(
            project("q"), project("k"), project("v"), None, dropout, deterministic
        )
        return out[..., 0, :]


def _runs(
    samples: int, features: int, flops_per_run: float, probs_per_run: float
) -> tuple[int, int]:
    """(chunks, runs per chunk) for the sampling target, the compute cap and the memory cap."""
    runs = max(4, min(math.ceil(samples / features), int(_MAX_FLOPS / flops_per_run)))
    chunk = max(1, min(runs, int(_CHUNK_BYTES / (16 * probs_per_run))))
    return math.ceil(runs / chunk), chunk


@functools.lru_cache(maxsize=64)
def _programs(component: str, length: int, d_in: int, width: int, rate: float, causal: bool):
    """Jitted init + apply over a chunk of runs; stds are traced, so one compile per shape.

    width is d_k for "SHA" and the number of heads for "MHA". The modules take a batch axis.
    """
    zero = jnp.zeros((1, length, d_in), jnp.float32)
    mask = causal_mask(length) if causal else None
    norm = LayerNorm()
    norm_params = norm.init(jax.random.PRNGKey(0), zero)

    def call(params: Any, xs: jax.Array, key: jax.Array, stds: jax.Array, init_only: bool = False):
        init = LayerInit(Stds(*stds))
        if component == "SHA":
            module, args = SingleHeadAttention(width, rate), (init, rate == 0.0)
        else:
            module, args = MultiHeadAttention(width, dropout_rate=rate), (mask, init, rate == 0.0)
        if init_only:
            return nn.meta.unbox(module.init(key, xs, *args))
        return module.apply(params, xs, *args, rngs={"dropout": key})

    @jax.jit
    def apply_runs(keys: jax.Array, stds: jax.Array, inputs: jax.Array) -> jax.Array:
        """keys: (runs, 2) init and dropout keys of each run; inputs: (runs, L, d_in)."""
        if component == "MHA":  # LayerNorm output forward, identity Jacobian backward
            inputs = inputs + jax.lax.stop_gradient(norm.apply(norm_params, inputs) - inputs)

        def one_run(run_keys: jax.Array, xs: jax.Array) -> jax.Array:
            params = call(None, zero, run_keys[0], stds, init_only=True)
            return call(params, xs[None], run_keys[1], stds)[0]

        return jax.vmap(one_run)(keys, inputs)

    return apply_runs


def _measure_runs(
    apply_runs,
    stds: tuple[float, ...],
    key: jax.Array,
    x_shape: tuple[int, int],
    x: Signal,
    g: Grad,
    chunks: int,
    chunk: int,
) -> dict[str, float]:
    """Averages `measure` over chunks of runs; every run has its own params and dropout key."""
    std_arr = jnp.asarray(stds, jnp.float32)
    totals: dict[str, float] = {}
    for _ in range(chunks):
        key, k_runs, k_meas = jax.random.split(key, 3)
        run_keys = jax.random.split(k_runs, (chunk, 2))
        fn = functools.partial(apply_runs, run_keys, std_arr)
        stats = measure(fn, k_meas, (chunk, *x_shape), x, g)
        for name, val in stats.items():
            totals[name] = totals.get(name, 0.0) + val / chunks
    return totals


@dataclasses.dataclass(frozen=True)
class SHACase:
    """One configuration of the authors' SHA sweep (theory.md 3.1)."""

    params: Mapping[str, float]
    samples: int = _SHA_SAMPLES
    component: str = "SHA"

    def _kw(self) -> dict[str, Any]:
        p = self.params
        d_in = int(p["d_in"])
        sigma_q = p["sigma_q_scale"] / math.sqrt(d_in)  # W_q, W_k ~ N(0, sigma_q^2) (theory.md 1.7)
        return {
            "d_in": d_in,
            "d_k": int(p["d_k"]),
            "L": int(p["L"]),
            "p": p["p"],
            "sigma_q": sigma_q,
            "sigma_k": sigma_q,
            "sigma_v": p["sigma_v_scale"] / math.sqrt(d_in),
        }

    def _moments(self) -> tuple[Signal, Grad]:
        p = self.params
        return Signal(0.0, p["s_x"] ** 2, p["r"]), Grad(p["s_g"] ** 2, p["r_g"])

    def predict(self) -> dict[str, float]:
        x, g = self._moments()
        kw = self._kw()
        return stats_of(theory.sha_forward(x, **kw), theory.sha_backward(x, g, **kw))

    def measure(self, key: jax.Array) -> dict[str, float]:
        x, g = self._moments()
        kw = self._kw()
        d_in, d_k, length = kw["d_in"], kw["d_k"], kw["L"]
        programs = _programs("SHA", length, d_in, d_k, float(kw["p"]), False)
        chunks, chunk = _runs(
            self.samples,
            min(d_in, d_k),
            6.0 * length * d_k * (3 * d_in + 2 * length),
            length * length,
        )
        stds = (kw["sigma_q"], kw["sigma_k"], kw["sigma_v"])
        return _measure_runs(programs, stds, key, (length, d_in), x, g, chunks, chunk)


def xavier_stds(d: int, heads: int) -> dict[str, float]:
    """The xavier baseline (theory.md 2.6): Q/K/V sqrt(2/(d + d_head)), output sqrt(1/d)."""
    qkv = math.sqrt(2.0 / (d + d // heads))
    return {"sigma_q": qkv, "sigma_k": qkv, "sigma_v": qkv, "sigma_o": math.sqrt(1.0 / d)}


@dataclasses.dataclass(frozen=True)
class MHACase:
    """One configuration of the project's MultiHeadAttention on a LayerNorm output."""

    params: Mapping[str, float]
    samples: int = _MHA_SAMPLES
    component: str = "MHA"

    def _kw(self) -> dict[str, Any]:
        p = self.params
        d, heads = int(p["d"]), int(p["heads"])
        causal = bool(p["causal"])
        return {
            "d": d,
            "heads": heads,
            "L": int(p["L"]),
            "p_attn": p["p_attn"],
            "causal": causal,
            **xavier_stds(d, heads),
        }

    def _moments(self) -> tuple[Signal, Grad]:
        return Signal(0.0, 1.0, self.params["r"]), Grad(1.0, self.params["r_g"])

    def predict(self) -> dict[str, float]:
        x, g = self._moments()
        kw = self._kw()
        return stats_of(theory.mha_forward(x, **kw), theory.mha_backward(x, g, **kw))

    def measure(self, key: jax.Array) -> dict[str, float]:
        x, g = self._moments()
        kw = self._kw()
        d, heads, length = kw["d"], kw["heads"], kw["L"]
        programs = _programs("MHA", length, d, heads, float(kw["p_attn"]), kw["causal"])
        chunks, chunk = _runs(
            self.samples, d, 6.0 * length * d * (4 * d + 2 * length), heads * length * length
        )
        stds = (kw["sigma_q"], kw["sigma_k"], kw["sigma_v"], kw["sigma_o"])
        return _measure_runs(programs, stds, key, (length, d), x, g, chunks, chunk)


def plain_relative_statistics(component: str) -> tuple[str, ...]:
    """Statistics scored with plain relative error (the authors' SHA "g cov")."""
    return ("g cov",) if component == "SHA" else ()


# The authors' SHA sweep (theory.md 3.1): 26244 configurations.
SHA_GRID: dict[str, tuple[float, ...]] = {
    "s_x": (1.0,),
    "r": (0.0, 1 / 3, 2 / 3),
    "sigma_v_scale": (10**-0.5, 1.0, 10**0.5),
    "sigma_q_scale": (0.1, 0.245, 0.6),
    "p": (0.0, 1 / 3, 2 / 3),
    "s_g": (10**-0.5, 1.0, 10**0.5),
    "r_g": (0.0, 1 / 3, 2 / 3),
    "d_in": (100, 316, 1000),
    "d_k": (32, 64, 128, 256),
    "L": (300, 547, 1000),
}
# Default (CPU) SHA subset: one length, two widths of the same grid (6 compiled programs).
SHA_SMALL = {**SHA_GRID, "d_in": (100, 316), "d_k": (128,), "L": (300,)}
# The LM regime at init: LayerNorm input, xavier stds, causal and bidirectional; "shape" is
# (d, heads, L), with d_head >= 16.
MHA_GRID: dict[str, tuple[Any, ...]] = {
    "shape": tuple(
        (d, h, n)
        for d, h, n in itertools.product(
            (32, 64, 128, 256, 512, 1024), (2, 4, 8, 16), (16, 64, 128, 256, 512)
        )
        if d // h >= 16
    ),
    "r": (0.0, 0.2, 0.5, 0.8, 0.9),
    "r_g": (0.0, 0.3, 0.6, 0.9),
    "p_attn": (0.0, 0.1),
    "causal": (0, 1),
}
MHA_SMALL = {**MHA_GRID, "shape": ((64, 2, 128), (128, 8, 64))}


def sample_grid(grid: Mapping[str, tuple[Any, ...]], size: int, seed: int) -> list[dict[str, Any]]:
    """`size` configurations of the Cartesian product, drawn without replacement (fixed seed)."""
    product = list(itertools.product(*grid.values()))
    chosen = random.Random(seed).sample(product, min(size, len(product)))
    return [dict(zip(grid, values, strict=True)) for values in chosen]


def _mha_params(config: Mapping[str, Any]) -> dict[str, float]:
    d, heads, length = config["shape"]
    rest = {k: v for k, v in config.items() if k != "shape"}
    return {"d": d, "heads": heads, "L": length, **rest}


def cases(full: bool = False) -> list[SHACase | MHACase]:
    """Default: 20 SHA + 20 MHA configurations (about 1.5 minutes on 2 idle CPU cores).

    full=True: 96 configurations drawn at random (seed 0) from the authors' 26244-configuration
    SHA grid (all of it takes ~8 min on an A100 and days on 2 CPU cores, where compiling each
    shape costs seconds), plus 16 MHA configurations over the whole LM-regime grid (d up to 1024,
    L up to 512), 8192 samples each: about 10 minutes on 2 idle CPU cores.
    """
    if full:
        sha = [SHACase(c, samples=8192) for c in sample_grid(SHA_GRID, 96, 0)]
        mha = [MHACase(_mha_params(c), samples=8192) for c in sample_grid(MHA_GRID, 16, 0)]
    else:
        sha = [SHACase(c) for c in sample_grid(SHA_SMALL, 20, 0)]
        mha = [MHACase(_mha_params(c)) for c in sample_grid(MHA_SMALL, 20, 0)]
    return [*sha, *mha]
