r"""Closed-form moment maps of softmax attention at initialization, forward and backward.

Sources: theory.md 1.6 (softmax), 1.7 (single-head attention, the authors' `SHA.py`), 1.9 (the
attention block), 1.11 (what the authors' code leaves out). All functions are pure functions of
python floats (numpy quadratures, no sampling).

Setting (one head). X: L x d_in, zero mean, variance s^2, inter-token correlation r, written
x_j = sqrt(r) u + sqrt(1-r) e_j per feature. q = W_q^T x, k, v likewise (W ~ N(0, sigma^2), head
dim d_k); s_q^2 = d_in sigma_q^2 s^2 (s_k^2, s_v^2 likewise); logits z_ij = q_i.k_j / sqrt(d_k),
Var(z) = V_z = s_q^2 s_k^2. P = softmax(z) (causal: row i sees n_i = i+1 keys), A = D P/(1-p)
(attention-probability dropout), context c = A V; upstream gradient g (variance s_g^2,
correlation r_g). A non-zero input mean acts as one more shared component (s^2 <- s^2 + mu^2,
r <- (r s^2 + mu^2)/(s^2 + mu^2)).

1. Logits of one query. Given q_i and the weights, the key-varying parts k'_j are i.i.d. over
   keys, so z_i. is an i.i.d. sample of variance tau_i = (1-r) s^2 |W_k q_i|^2 / d_k, mean
   tau = (1-r) V_z (the shared part of k shifts a row and cancels in softmax; tau is the
   (1-r) s^2 of 1.6). tau_i varies over queries (chi-square factors from |x|, |q|, W_k): a Gamma
   law of relative variance (1+2/d_in)^a (1+2/d_k) - 1 (a = 2 Gaussian input, 1 LayerNorm input).
   Logits are Gaussian for Gaussian inputs; for LayerNorm inputs (fixed |x_j|) a logit is a
   sphere projection, density ~ (1 - z^2/(m tau))^((m-3)/2), m = (d_in+2)/(1-r)^2 - 2 (its
   kurtosis, measured).
2. Softmax functionals of the i.i.d. logits of one row (theory/softmax_functionals.py): M2 =
   E sum P^2, M3, F1 (the softmax Jacobian's weight), Z1, Z2, ZP and the row-pair K below.
   Two rows share keys with logit correlation rho ~ r:
   K = n_max E[sum_j P_ij P_i'j] = (n_min M2(n_min))^rho, exact at rho = 0, at rho = 1 and for
   large n (e^(rho tau)); rho also absorbs the fluctuation of the row covariance tau_ii'. Causal
   rows of lengths n << n' instead have K = E[sum_j P_ij e^(rho z_j)] e^(-rho^2 tau/2) (the long
   row's normalizer no longer sees row i's keys); K interpolates between the two in n/n'.
3. Forward. c_i = v_u sum_j A_ij + sum_j A_ij v'_j. Given q_i and W, v'_j regresses on z_ij with
   coefficient Cov(z, v')/tau_i, and E_Wv Cov^2 = s_v^2 (1-r) tau_i / d_in, so
   E c^2 = r s_v^2 (1 + p M2/(1-p))
           + (1-r) s_v^2 [Z2/d_in + (1 - 1/d_in) M2/(1-p) + p ZP/((1-p) d_in)],
   Z2 = E Z1^2/tau (-> tau: the authors' T1 term), ZP = E sum P^2 z^2/tau. For LayerNorm inputs
   M2 becomes E sum P^2 (m - z^2/tau)/(m-1): the residual variance shrinks on attended keys.
   Inter-token: E c_i c_i' = r s_v^2 + (1-r) s_v^2 [K/n_max + r (Z2 - M2)/d_in].
   Uniform limit (tau -> 0): s_v^2 (r + (1-r)/L) bidirectional, s_v^2 (r + (1-r) H_L/L) causal.
4. Backward, dX = W_v a + W_q b + W_k c (value, query and key paths, and the value-key cross
   term below; the other cross terms are dropped: measured ~0). dA_ij = g_i.v_j,
   dZ_ij = P_ij (dA_ij - sum_l P_il dA_il).
   - Value path (the authors' only path): a_j = sum_i A_ij g_i; summed over all columns,
     sum_j E a_j^2 / s_g^2 = sum_i M2_i/(1-p) + r_g sum_(i != i') K_ii'/n_max, which for uniform
     attention is the (1/(1-p) + r_g (L-1))/L of 1.7; non-uniform attention multiplies its 1/L
     part by ~e^tau and its r_g part by ~e^(r tau).
   - Query path: b_i = d_k^-1/2 sum_j P_ij (eta_j - etabar)(k_j - kbar), eta_j = g_i.v'_j, with
     key-varying parts i.i.d. over keys. (i) Incoherent part: variance
     Var(eta) tr Cov(k') E[S2 - 2 S3 + S2^2] = (1-r)^2 s_v^2 s_k^2 |g|^2 d_k F1 (F1 ~ M2: 1/L).
     (ii) Coherent part: Cov(eta, k') = (1-r) s^2 W_k^T W_v g is the same for every key, so it
     survives the sum with weight (1 - S2); E|Cov|^2 = (1-r)^2 d_k s_k^2 s_v^2 |g|^2 / d_in. So
     Var = sigma_q^2 (1-r) s_k^2 s_v^2 s_g^2 [c_p ((d_k - 1) F1 + F3) + (1-r)(d_k/d_in) F2],
     F2 = F1 + E(1-S2)^2, F3 the logit-direction part, c_p = (1 - r + r p)/((1-r)(1-p)) (dropout
     breaks the cancellation of the shared value). Next to the value path this is
     ~ (1-r) tau (1/L + 1/d_in)/(r_g + 1/L): up to ~50% on the authors' grid (their 44.5% p99),
     and larger than the value path when tau ~ 2-3 (an LM at init).
   - Key path: c_j = d_k^-1/2 sum_i P_ij (eta_ij - etabar_i) q_i. Same-query terms give F1
     weighted by |q_i|^2 ~ tau_i; pairs i != i' give (1-r) r_eff r_g s_v^2 s_q^2 K (a key that all
     queries favour collects the shared gradient), centred by E[sum_j P_ij P_i'j (1 - P_ij -
     P_i'j + ...)], with r_eff = r + c tau (1 + r^2)/d_k the bias of q_i.q_i' on keys favoured by
     both rows (the tilt of q.q' by K ~ e^(c tau_ii'), c = mean log(n M2)/tau <= 1 saturating on
     short rows). sum_j c_j = 0 exactly (softmax rows sum to 1).
   - Value-key cross term (the one cross term between paths that survives): W_v enters the
     value path (W_v a_j) and the key path (through eta = g.(W_v^T x)), so averaging over W_v
     alone, exactly, E[(W_v a_j).(W_k c_j)] = sigma_v^2 sum_i P_ij (z_ij - zbar_i) a_j.g_i
     (zbar_i = sum_l P_il z_il; sum over the d_in features). With a_j = sum_i' A_i'j g_i' it
     needs E sum_j P_ij (z_ij - zbar_i) A_i'j. Scaling the logits by beta, dP_ij/dbeta =
     P_ij (z_ij - zbar_i), so for i' = i it is (1/2) d/dbeta E sum P^2 = tau dM2/dtau (/(1-p)
     with dropout), and the two orders of a pair i != i' sum to 2 tau d(K_ii'/n_max)/dtau
     (tau e^tau / n and rho tau e^(rho tau) / n_max on Gaussian logits at large n; the
     slopes of step 2's functionals, measured within 2% at r >= 0.87 and 7% at r = 0.5).
     So the input gradient gains, per element and summed over tokens,
     2 sigma_v^2 (d_k/d_in) s_g^2 [sum_i tau M2_i'/(1-p) + r_g sum_(i != i') tau K_ii''/n_max]:
     O(r tau/d_in) relative to the value path. It adds to the variance only (the key path's
     column sum is 0), so it lowers the gradient correlation: at d = 256, 4 heads, L = 128,
     r = 0.87, r_g = 0.49, p = 0.1 (a bidirectional Post-LN stack with dropout), +0.17% of
     the variance, 0.00233 per element against 0.00227 +- 0.00006 measured by stop-gradient
     paths; left out, the correlation was 0.0025 +- 0.0006 above the real module's.
   - Inter-token covariance from the exact column sum sum_j dX_j = W_v sum_i g_i sum_j A_ij
     + W_q sum_i b_i: Cov = (E|sum_j dX_j|^2 - sum_j E dX_j^2)/(L(L-1)).
   Approximations: independent paths and heads; the self-key correlation of causal rows is
   ignored (O(d_k/d_in) on short rows); pair functionals interpolate log-linearly in rho. Checked
   against the real modules to a few % for tau <~ 4, d_k >= 16, L >= 16 (attention_sweeps.py).
   Position-resolved maps on (L, L) token covariances: attention_positions.py (in a causal
   stack keys are not exchangeable, the first tokens being less correlated with the rest).
5. Multi-head block (nn/attention.py): H heads of the map above with d_in = d, d_k = d_head; W_o
   (fan-in H d_head, std sigma_o) multiplies the forward moments by H d_head sigma_o^2 and feeds
   each head the gradient variance d sigma_o^2 s_g^2 with the same r_g; head gradients add. Its
   input is a LayerNorm output, so the sphere-projection logits of step 1 are used.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from deepscale_jax.theory.measure import Grad, Signal
from deepscale_jax.theory.softmax_functionals import softmax_functionals

_TAU_STEP = 0.02  # relative step in tau of the functionals' slopes (`Head._tau_slopes`)


def keys_seen(length: int, causal: bool) -> np.ndarray:
    """n_i, the number of keys query row i sees: i + 1 under a causal mask, else all L."""
    return np.arange(1.0, length + 1) if causal else np.full(length, float(length))


@dataclasses.dataclass(frozen=True)
class Head:
    """One attention head on a given input; every derived quantity of the docstring."""

    x: Signal
    d_in: int
    d_k: int
    length: int
    sigma_q: float
    sigma_k: float
    sigma_v: float
    p: float
    causal: bool
    layer_norm_input: bool

    @property
    def s2(self) -> float:
        return self.x.var + self.x.mean**2

    @property
    def r(self) -> float:
        return (self.x.corr * self.x.var + self.x.mean**2) / self.s2 if self.s2 > 0 else 1.0

    def proj_var(self, sigma: float) -> float:
        return self.d_in * sigma**2 * self.s2

    @property
    def tau(self) -> float:
        return (1 - self.r) * self.proj_var(self.sigma_q) * self.proj_var(self.sigma_k)

    @property
    def d_eff(self) -> float:
        if not self.layer_norm_input or self.r >= 1 - 1e-6:
            return math.inf
        m = (self.d_in + 2) / (1 - self.r) ** 2 - 2
        return math.inf if m > 1e4 else m

    @property
    def spread(self) -> float:
        """Relative variance of tau_i over queries."""
        return (1 + 2 / self.d_in) ** (1 if self.layer_norm_input else 2) * (1 + 2 / self.d_k) - 1

    @functools.cached_property
    def f(self) -> dict[str, np.ndarray]:
        args = (self.tau, 1 / self.spread, self.length, self.causal, self.d_eff)
        return softmax_functionals(*args, self.rho if self.causal else 0.0)

    @property
    def rho(self) -> float:
        """Effective logit correlation of two rows (module docstring, step 2)."""
        tau, r = self.tau, self.r
        if tau <= 0:
            return r
        a = 0 if self.layer_norm_input else 1
        v_ii = tau**2 * self.spread
        v_ij = tau**2 * ((1 + r * r) / self.d_k + 2 * r * r * (1 + a) / self.d_in)
        return (r * tau + v_ij / 2) / (tau + v_ii / 2)

    def pair_overlap(self) -> np.ndarray:
        """(L, L) E sum_j A_ij A_i'j = K_ii'/n_max for rows i != i' (as in `pairs`), 0 on the
        diagonal."""
        f, rho, length = self.f, self.rho, self.length
        if not self.causal:
            k = (length * f["M2"][0]) ** rho / length
            return k * (1.0 - np.eye(length))
        n = np.arange(1, length + 1, dtype=float)
        frac = np.triu(n[:, None] / n[None, :], 1)
        log_k = (1 - frac) * np.log(f["T"])[:, None] + frac * np.log((n * f["M2"]) ** rho)[:, None]
        upper = np.triu(np.exp(log_k), 1) / n[None, :]
        return upper + upper.T

    @functools.cached_property
    def pairs(self) -> tuple[float, float, float]:
        """sum_{i != i'} of K/n_max, of its centred version, and of the doubly centred one."""
        f, rho, length = self.f, self.rho, self.length
        n = keys_seen(length, self.causal)
        k_min = (n * f["M2"]) ** rho
        g3 = f["M2"] ** (1 - rho) * (n * f["M3"]) ** rho
        if self.causal:  # rows i < i': interpolate K from n_i = n_i' (k_min) to n_i << n_i' (T)
            frac = np.triu(n[:, None] / n[None, :], 1)
            k = np.triu(
                np.exp((1 - frac) * np.log(f["T"])[:, None] + frac * np.log(k_min)[:, None]), 1
            )
            pair = 2 * np.sum(k / n[None, :])
            upper = np.triu(np.ones((length, length)), 1)
            g3_sum = np.sum(upper * (g3[:, None] + g3[None, :]) / n[None, :])
            pair1 = 2 * (np.sum(k / n[None, :]) - g3_sum + np.sum((k / n[None, :]) ** 2))
        else:
            pair = (length - 1) * k_min[0]
            pair1 = (length - 1) * (k_min[0] - 2 * g3[0] + k_min[0] ** 2 / length)
        pair1 = max(pair1, 0.0)
        return pair, pair1, max(2 * pair1 - pair, 0.0)

    @property
    def omegas(self) -> tuple[np.ndarray, np.ndarray]:
        """E sum P^2 w and E sum P^2 w^2, w = (m - z^2/tau)/(m-1) (LayerNorm input; else M2)."""
        f, m = self.f, self.d_eff
        if math.isinf(m):
            return f["M2"], f["M2"]
        om1 = (m * f["M2"] - f["ZP"]) / (m - 1)
        return om1, (m * m * f["M2"] - 2 * m * f["ZP"] + f["ZP4"]) / (m - 1) ** 2

    def row_variances(self) -> np.ndarray:
        """Variance of the context at each query row (length L): causal rows differ, row 0
        (one key) passes its own value through unaveraged."""
        f, r, p, d_in = self.f, self.r, self.p, self.d_in
        sv2, om1 = self.proj_var(self.sigma_v), self.omegas[0]
        own = f["Z2"] / d_in + (1 - 1 / d_in) * om1 / (1 - p) + p / (1 - p) * f["ZP"] / d_in
        return r * sv2 * (1 + p / (1 - p) * f["M2"]) + (1 - r) * sv2 * own

    def forward(self) -> tuple[float, float]:
        """(variance, inter-token covariance) of the context A V."""
        f, r, sv2, d_in, length = (
            self.f,
            self.r,
            self.proj_var(self.sigma_v),
            self.d_in,
            self.length,
        )
        var = np.mean(self.row_variances())
        coh = np.sqrt(np.maximum(f["Z2"] - f["M2"], 0.0) / d_in)
        pair_sum = self.pairs[0] + r * (coh.sum() ** 2 - (coh**2).sum())
        return float(var), float(r * sv2 + (1 - r) * sv2 * pair_sum / (length * (length - 1)))

    def backward(self, g: Grad) -> tuple[float, float]:
        """(variance, inter-token covariance) of dLoss/dX through this head."""
        f, r, p, d_k, d_in, length = self.f, self.r, self.p, self.d_k, self.d_in, self.length
        sq2, sk2, sv2 = (self.proj_var(s) for s in (self.sigma_q, self.sigma_k, self.sigma_v))
        sg2, rg, m2 = g.var, g.corr, f["M2"]
        pair, pair1, pair2 = self.pairs
        om1, om2 = self.omegas
        c_p = (1 - r + r * p) / (1 - p)
        value = d_k * self.sigma_v**2 * sg2 * (np.sum(m2) / (1 - p) + rg * pair)
        f1_sphere = f["F1"] * np.divide(om2, m2)
        query_rows = (self.sigma_q**2 * sk2 * (1 - r) * sv2 * sg2) * (
            c_p * ((d_k - 1) * f1_sphere + f["F3"]) + (1 - r) * (d_k / d_in) * f["F2"]
        )
        r_eff = r + self.query_tilt
        key = (self.sigma_k**2 * sq2 * sv2 * sg2 * d_k) * (
            c_p * np.sum(f["F1q"] * np.divide(om1, m2)) + (1 - r) * r_eff * rg * pair1
        )
        total = value + query_rows.sum() + key + self.value_key_cross(sg2, rg)
        one_minus = np.sum(1 - m2) ** 2 - np.sum((1 - m2) ** 2)
        query_pairs = (self.sigma_q**2 * (1 - r) ** 2 * sk2 * sv2 * sg2 * rg) * (
            (d_k / d_in) * one_minus + d_k * pair2
        )
        column_sum = (
            d_k
            * self.sigma_v**2
            * sg2
            * (np.sum(1 + p / (1 - p) * m2) + rg * length * (length - 1))
        )
        total_sq = column_sum + query_rows.sum() + query_pairs
        return float(total / length), float((total_sq - total) / (length * (length - 1)))

    @functools.cached_property
    def _tau_slopes(self) -> tuple[np.ndarray, np.ndarray]:
        """tau d/dtau of M2 (per row) and of `pair_overlap` ((L, L)), by central differences
        over the head with every logit scaled (sigma_q -> sigma_q sqrt(1 +- eps): the logits'
        correlations, spread and sphere law unchanged)."""
        length = self.length
        if self.tau <= 0:
            return np.zeros(length), np.zeros((length, length))
        up, down = (
            dataclasses.replace(self, sigma_q=self.sigma_q * math.sqrt(1 + s * _TAU_STEP))
            for s in (1, -1)
        )
        return (
            (up.f["M2"] - down.f["M2"]) / (2 * _TAU_STEP),
            (up.pair_overlap() - down.pair_overlap()) / (2 * _TAU_STEP),
        )

    def value_key_own(self) -> np.ndarray:
        """Per row i: E sum_j P_ij (z_ij - zbar_i) A_ij = tau dM2_i/dtau / (1-p) (docstring,
        step 4, the value-key cross term)."""
        return self._tau_slopes[0] / (1 - self.p)

    def value_key_pairs(self) -> np.ndarray:
        """(L, L), rows i != i': E sum_j P_ij (z_ij - zbar_i) A_i'j, symmetrized over the two
        orders, = tau d(K_ii'/n_max)/dtau (docstring, step 4); 0 on the diagonal."""
        return self._tau_slopes[1]

    def value_key_cross(self, sg2: float, rg: float) -> float:
        """2 E[(W_v a).(W_k c)] summed over tokens, per element: the value-key cross term of
        the input gradient (docstring, step 4)."""
        functional = np.sum(self.value_key_own()) + rg * np.sum(self.value_key_pairs())
        return float(2 * self.sigma_v**2 * (self.d_k / self.d_in) * sg2 * functional)

    @property
    def mean_attention(self) -> np.ndarray:
        """E A: 1/n_i on the n_i keys row i sees (keys are exchangeable at initialization)."""
        length = self.length
        if not self.causal:
            return np.full((length, length), 1.0 / length)
        return np.tril(np.ones((length, length))) / np.arange(1, length + 1)[:, None]

    @property
    def query_tilt(self) -> float:
        """E[q.q' | both rows favour key j] / E|q|^2 - r: the tilt of two rows' query overlap
        by K ~ e^(c tau_ii'), c tau (1 + r^2)/d_k with c = dlog K/dtau = mean log(n M2)/tau
        (saturating on short rows); `backward`'s r_eff = r + this."""
        if self.tau <= 0:
            return 0.0
        n = keys_seen(self.length, self.causal)
        c_sat = float(np.mean(np.log(np.maximum(n * self.f["M2"], 1.0)))) / self.tau
        return c_sat * self.tau * (1 + self.r**2) / self.d_k

    @property
    def logit_scale(self) -> float:
        """V_z = s_q^2 s_k^2: a logit's variance per unit of (1 - input correlation)."""
        return self.proj_var(self.sigma_q) * self.proj_var(self.sigma_k)


def _check(length: int, p: float) -> None:
    if length < 2:
        raise ValueError(f"attention moments need L >= 2 tokens, got {length}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must lie in [0, 1), got {p}")


def _signal(var: float, cov: float) -> Signal:
    return Signal(mean=0.0, var=var, corr=cov / var if var > 0 else 1.0)


def sha_forward(
    x: Signal,
    *,
    d_in: int,
    d_k: int,
    L: int,
    sigma_q: float,
    sigma_k: float,
    sigma_v: float,
    p: float,
) -> Signal:
    """Context moments of single-head attention A X W_v (theory.md 1.7), Gaussian input x."""
    _check(L, p)
    head = Head(x, d_in, d_k, L, sigma_q, sigma_k, sigma_v, p, False, False)
    return _signal(*head.forward())


def sha_backward(
    x: Signal,
    g: Grad,
    *,
    d_in: int,
    d_k: int,
    L: int,
    sigma_q: float,
    sigma_k: float,
    sigma_v: float,
    p: float,
) -> Grad:
    """dLoss/dX moments of single-head attention: value, query and key paths (docstring, step 4)."""
    _check(L, p)
    head = Head(x, d_in, d_k, L, sigma_q, sigma_k, sigma_v, p, False, False)
    var, cov = head.backward(g)
    return Grad(var=var, corr=cov / var if var > 0 else 0.0)


def mha_head(
    x: Signal, d: int, heads: int, L: int, sq: float, sk: float, sv: float, p: float, causal: bool
) -> Head:
    _check(L, p)
    if not 1 <= heads <= d:
        raise ValueError(f"need 1 <= heads <= d, got heads={heads}, d={d}")
    return Head(x, d, d // heads, L, sq, sk, sv, p, causal, True)


def mha_forward(
    x: Signal, *, d: int, heads: int, L: int, sigma_q: float, sigma_k: float, sigma_v: float,
    sigma_o: float, p_attn: float, causal: bool,
) -> Signal:  # fmt: skip
    """Output moments of `nn.attention.MultiHeadAttention` (zero biases) on a LayerNorm output x."""
    head = mha_head(x, d, heads, L, sigma_q, sigma_k, sigma_v, p_attn, causal)
    var, cov = head.forward()
    gain = heads * head.d_k * sigma_o**2
    return _signal(gain * var, gain * cov)


def mha_cross_forward(
    x: Signal, *, d: int, heads: int, L: int, sigma_q: float, sigma_k: float, sigma_v: float,
    sigma_o: float, p_attn: float, causal: bool,
) -> float:  # fmt: skip
    """Output covariance of `MultiHeadAttention` between tokens of two *different* sequences
    whose inputs have covariance x.cov (and mean x.mean): attention rows sum to 1 and the two
    sequences' attention weights are independent, so only the shared part passes:
    d sigma_o^2 d sigma_v^2 (x.cov + x.mean^2)."""
    _check(L, p_attn)
    return d * sigma_o**2 * d * sigma_v**2 * (x.cov + x.mean**2)


def mha_backward(
    x: Signal, g: Grad, *, d: int, heads: int, L: int, sigma_q: float, sigma_k: float,
    sigma_v: float, sigma_o: float, p_attn: float, causal: bool,
) -> Grad:  # fmt: skip
    """dLoss/dx moments of `MultiHeadAttention` given the output-gradient moments g."""
    head = mha_head(x, d, heads, L, sigma_q, sigma_k, sigma_v, p_attn, causal)
    var, cov = head.backward(Grad(var=d * sigma_o**2 * g.var, corr=g.corr))
    return Grad(var=heads * var, corr=cov / var if var > 0 else 0.0)
