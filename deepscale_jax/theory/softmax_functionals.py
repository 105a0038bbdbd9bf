r"""Softmax functionals of n i.i.d. logits, the quadratures behind theory/attention.py.

Source: theory.md 1.6 (softmax at initialization); used by attention.py (its step 2 and on).
Logits z_1..z_n of one query row are i.i.d. with variance tau: N(0, tau) for Gaussian inputs,
or a sphere projection (density ~ (1 - z^2/(m tau))^((m-3)/2)) for LayerNorm inputs. With
P = softmax(z) and S = sum e^z, every functional used is exact at any tau and n: since
    1/S^A = int_0^inf t^(A-1) e^(-tS) dt / Gamma(A),
for distinct keys j_1..j_M
    E[prod_m P_jm^a_m z_jm^b_m] = int t^(A-1)/Gamma(A) prod_m psi_(a_m,b_m)(t) phi(t)^(n-M) dt,
psi_ab(t) = E[z^b e^(a z - t e^z)], phi = psi_00: one-dimensional quadratures. Returned: M2 =
E sum P^2 (= e^tau/n for large n, the e^((1-r)Var(logit)) of theory.md 1.6; 1/n if uniform),
M3, E (sum P^2)^2, Z1 = sum P z, sum P^2 z^2 and F1 = E[S2 - 2 S3 + S2^2] (the weight of the
softmax Jacobian), averaged over the per-query variance tau_i ~ Gamma; for causal rows also
T = E[sum_j P_j e^(rho z_j)] e^(-rho^2 tau/2), the row-pair weight of a short row against a
long one.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy.special import gammaln, roots_genlaguerre

_DX, _DU, _TAU_NODES, _DENSE_N, _SPARSE_N = 0.1, 0.2, 10, 32, 40

# name -> list of index groups; each group lists (power of P, power of z) over distinct keys.
_TERMS: dict[str, tuple[tuple[tuple[int, int], ...], ...]] = {
    "S2": (((2, 0),),),
    "S3": (((3, 0),),),
    "S22": (((4, 0),), ((2, 0), (2, 0))),
    "Z1Z1": (((2, 2),), ((1, 1), (1, 1))),
    "P2Z2": (((2, 2),),),
    "P2Z4": (((2, 4),),),
    "Z1P2Z": (((3, 2),), ((1, 1), (2, 1))),
    "Z1Z1S2": (
        ((4, 2),),
        ((2, 2), (2, 0)),
        ((3, 1), (1, 1)),
        ((3, 1), (1, 1)),
        ((1, 1), (1, 1), (2, 0)),
    ),
}


def _logit_law(tau: float, d_eff: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid and weights of one logit: N(0, tau), or the sphere projection with d_eff dimensions."""
    x = np.arange(-9.0, 9.0 + 4.0 * math.sqrt(tau) + _DX, _DX)
    if math.isinf(d_eff):
        w = np.exp(-0.5 * x**2)
    else:
        x = x[np.abs(x) < math.sqrt(d_eff)]
        w = np.exp(0.5 * (d_eff - 3.0) * np.log1p(-(x**2) / d_eff))
    return math.sqrt(tau) * x, w / w.sum()


def _uniform_moments(n: np.ndarray) -> dict[str, np.ndarray]:
    """tau -> 0 limits of `_moments` (uniform attention)."""
    f1 = (n - 1) / n**2
    return {"M2": 1 / n, "M3": 1 / n**2, "F1": f1, "F2": f1 + (1 - 1 / n) ** 2,
            "Z2": 1 / n, "ZP": 1 / n, "ZP4": 3 / n, "F3": f1}  # fmt: skip


def _moments(tau: float, n: np.ndarray, d_eff: float, rho: float | None) -> dict[str, np.ndarray]:
    """Softmax functionals of n i.i.d. logits of variance tau (module docstring).

    With rho, also "T" = E[sum_j P_j e^(rho z_j)] e^(-rho^2 tau/2): n_max E[sum_j P_ij P_i'j] for
    a row i' much longer than row i (its normalizer then is independent of row i's keys).
    """
    if tau < 1e-9:
        return {**_uniform_moments(n), "T": np.ones_like(n)}
    z, w = _logit_law(tau, d_eff)
    u = np.arange(
        -math.log(n.max()) - 4 * tau - 4 * math.sqrt(tau) - 40.0, 6 + 4 * math.sqrt(tau), _DU
    )
    te = np.outer(np.exp(u), np.exp(z))
    decay = np.exp(-te)
    log_phi = np.maximum(np.log(np.maximum(1.0 - (-np.expm1(-te)) @ w, 1e-300)), -1e4)
    psi = functools.cache(lambda a, b: decay @ (w * np.exp(a * z) * z**b))
    raw = {}
    for name, groups in _TERMS.items():
        total = np.zeros_like(n)
        for group in groups:
            m, big_a = len(group), sum(a for a, _ in group)
            prod = np.prod([psi(a, b) for a, b in group], axis=0)
            log_count = gammaln(n + 1) - gammaln(np.maximum(n - m + 1, 1))
            expo = (n[:, None] - m) * log_phi + big_a * u + (log_count[:, None] - gammaln(big_a))
            expo = np.where(n[:, None] >= m, expo, -np.inf)
            total += (np.exp(expo) * prod).sum(1) * _DU
        raw[name] = total
    if rho is not None:
        tilted = decay @ (w * np.exp((1 + rho) * z))
        integral = (np.exp((n[:, None] - 1) * log_phi + u) * tilted).sum(1) * _DU
        raw["T"] = n * integral * math.exp(-rho * rho * tau / 2)
    s2, s3, s22 = raw["S2"], raw["S3"], raw["S22"]
    f1 = s2 - 2 * s3 + s22
    f3 = (raw["P2Z2"] - 2 * raw["Z1P2Z"] + raw["Z1Z1S2"]) / tau
    return {"M2": s2, "M3": s3, "F1": f1, "F2": f1 + 1 - 2 * s2 + s22, "Z2": raw["Z1Z1"] / tau,
            "ZP": raw["P2Z2"] / tau, "ZP4": raw["P2Z4"] / tau**2, "F3": f3,
            **({"T": raw["T"]} if rho is not None else {})}  # fmt: skip


@functools.lru_cache(maxsize=512)
def softmax_functionals(
    tau: float, shape: float, length: int, causal: bool, d_eff: float, rho: float = 0.0
) -> dict[str, np.ndarray]:
    """Functionals per query row (length L), averaged over tau_i ~ Gamma(shape, tau/shape).

    "F1q" is F1 weighted by tau_i/tau (the |q_i|^2 factor of the key path). Causal rows (n = 1..L)
    are evaluated at 32 + 40 lengths and interpolated in log n; they also get "T" (`_moments`)
    for the row correlation rho.
    """
    if causal:
        grid = np.unique(
            np.concatenate(
                [np.arange(1, _DENSE_N + 1), np.geomspace(_DENSE_N, length, _SPARSE_N).round()]
            )
        )
        grid = grid[grid <= length].astype(float)
    else:
        grid = np.array([float(length)])
    if tau < 1e-9 or shape > 1e7:
        nodes, weights = np.array([1.0]), np.array([1.0])
    elif shape > 50:  # nearly normal; generalized Laguerre weights overflow for large shapes
        x, wts = np.polynomial.hermite_e.hermegauss(_TAU_NODES)
        nodes, weights = np.maximum(1 + x / math.sqrt(shape), 1e-3), wts / wts.sum()
    else:
        x, wts = roots_genlaguerre(_TAU_NODES, shape - 1)
        nodes, weights = x / shape, wts / wts.sum()
    acc: dict[str, np.ndarray] = {}
    for node, weight in zip(nodes, weights, strict=True):
        f = _moments(tau * node, grid, d_eff, rho if causal else None)
        f["F1q"] = f["F1"] * node
        for key, val in f.items():
            acc[key] = acc.get(key, 0.0) + weight * val
    if not causal:
        return {k: np.full(length, v[0]) for k, v in acc.items()}
    n = np.arange(1, length + 1, dtype=float)
    return {k: np.interp(np.log(n), np.log(grid), v) for k, v in acc.items()}
