"""Closed-form moment maps of transformer components at initialization.

Every component has a pair of pure functions on plain floats (callable from a python recursion):

    <name>_forward(x: Signal, **shape) -> Signal     moments of the output, given the input's
    <name>_backward(x: Signal, g: Grad, **shape) -> Grad
                                                     moments of dLoss/d(input), given the forward
                                                     *input* moments x and g = dLoss/d(output)

(embeddings: forward only, no input signal). Notation as in theory.md: a signal has mean mu,
variance s^2 and inter-token correlation r (covariance r s^2 of one feature at two tokens); d is
the width the component acts on, L the number of logits of a softmax. Weights are i.i.d.
N(0, sigma_w^2) and biases 0. Sources: Kedia et al., "Transformers Get Stable" (ICML 2024,
arXiv 2403.09635) and its simulation scripts, written out in shared/reference/theory.md sec. 1
("T1.x" below). RMSNorm/ScaleNorm and the finite-width/finite-L terms marked "ours" are derived
here (second-order delta method, errors O(1/d^2) or O(1/L^2)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from deepscale_jax.theory.measure import Grad, Signal

# --------------------------------------------------------------------------------- embeddings


def embeddings_forward(
    *, sigma_e: float, num_tables: int = 3, p: float = 0.0, r0: float = 0.0
) -> Signal:
    """Sum of `num_tables` independent embedding lookups of std sigma_e, then dropout p (T1.8).

    mu = 0, s^2 = k sigma_e^2 / (1 - p). The inter-token correlation r0 before dropout comes from
    rows shared between tokens (repeated words, one segment id) and is data-dependent, so it is an
    input (the authors hard-code r0 = 0.221 for BERT/Wikipedia; `shared_row_correlation` gives
    it from sharing probabilities); dropout keeps the covariance, so r = (1 - p) r0.
    """
    return dropout_forward(Signal(0.0, num_tables * sigma_e**2, r0), p=p)


def shared_row_correlation(share_probs: Sequence[float], variances: Sequence[float]) -> float:
    """r0 of a sum of tables: sum_t pi_t var_t / sum_t var_t (ours).

    pi_t = probability that two distinct positions read the same row of table t (sum of squared
    unigram frequencies for words, 0 for learned positions, P(same segment) for token types);
    distinct rows are independent, so the covariance of the sum is sum_t pi_t var_t.
    """
    total = sum(variances)
    return sum(pi * v for pi, v in zip(share_probs, variances, strict=True)) / total


# ------------------------------------------------------------------------------------- linear


def _corr(cov: float, var: float) -> float:
    """cov / var, clipped to [-1, 1] (rounding can push a collapsed stream's ratio past 1)."""
    return min(1.0, max(-1.0, cov / var)) if var > 0 else 0.0


def linear_forward(x: Signal, *, d_in: int, d_out: int, sigma_w: float) -> Signal:
    """y = x W, W in R^{d_in x d_out}, W_ij ~ N(0, sigma_w^2) (T1.1).

    mu_y = 0; s_y^2 = d_in sigma_w^2 (s^2 + mu^2); Cov_y = d_in sigma_w^2 (mu^2 + r s^2): the mean
    of x enters like a fully shared component. `d_out` is unused (uniform shape arguments).
    """
    del d_out
    gain = d_in * sigma_w**2
    var = gain * x.second_moment
    return Signal(0.0, var, _corr(gain * (x.mean**2 + x.cov), var))


def linear_backward(x: Signal, g: Grad, *, d_in: int, d_out: int, sigma_w: float) -> Grad:
    """g_in = W g (T1.1): s_gin^2 = d_out sigma_w^2 s_g^2, r_gin = r_g (fan-out d_out)."""
    del x, d_in
    return Grad(d_out * sigma_w**2 * g.var, g.corr)


# ------------------------------------------------------------------------------------ dropout


def dropout_forward(x: Signal, *, p: float) -> Signal:
    """Inverted dropout y = m x / (1 - p), m ~ Bernoulli(1 - p) per element (T1.2).

    mu_y = mu; E y^2 = (s^2 + mu^2)/(1 - p) so s_y^2 = (s^2 + p mu^2)/(1 - p); independent masks
    keep E[y_i y_j] = E[x_i x_j], so Cov_y = r s^2.
    """
    var = (x.var + p * x.mean**2) / (1.0 - p)
    return Signal(x.mean, var, _corr(x.cov, var))


def dropout_backward(x: Signal, g: Grad, *, p: float) -> Grad:
    """g_in = m g / (1 - p) (T1.2): s_gin^2 = s_g^2/(1 - p), Cov_gin = r_g s_g^2."""
    del x
    var = g.var / (1.0 - p)
    return Grad(var, _corr(g.cov, var))


# -------------------------------------------------------------------------------- activations


def _require_zero_mean(x: Signal, name: str) -> None:
    if x.mean != 0.0:
        raise ValueError(f"{name} moment map assumes a zero-mean input, got mean {x.mean}")


def relu_forward(x: Signal) -> Signal:
    """ReLU of a zero-mean Gaussian (T1.3, arc-cosine kernel of degree 1).

    mu = s/sqrt(2 pi); s_y^2 = s^2 (pi - 1)/(2 pi);
    Cov_y = s^2 (pi r + sqrt(1 - r^2) - r arccos r - 1) / (2 pi).
    """
    _require_zero_mean(x, "relu")
    r, s2 = x.corr, x.var
    var = s2 * (math.pi - 1.0) / (2.0 * math.pi)
    cov = s2 * (math.pi * r + math.sqrt(1.0 - r * r) - r * math.acos(r) - 1.0) / (2.0 * math.pi)
    return Signal(math.sqrt(s2 / (2.0 * math.pi)), var, _corr(cov, var))


def relu_backward(x: Signal, g: Grad) -> Grad:
    """g_in = 1[x > 0] g (T1.3): s_gin^2 = s_g^2/2, Cov = (1/4 + arcsin(r)/(2 pi)) r_g s_g^2."""
    _require_zero_mean(x, "relu")
    var = g.var / 2.0
    return Grad(var, _corr((0.25 + math.asin(x.corr) / (2.0 * math.pi)) * g.cov, var))


def gelu_forward(x: Signal) -> Signal:
    """Exact (erf) GeLU x Phi(x) of a zero-mean Gaussian (T1.4); s = s_x^2, a = s/(1 + s).

    mu = s/sqrt(2 pi (1 + s)); s_y^2 = (s/(2 pi)) (pi - a - arccos a + 2a sqrt((1 - a)/(1 + a)));
    Cov_y = (s/4)[r + (2/pi) r arcsin(r a)
                  + (2/pi) s (s (1 - r^2) + 1 + r^2) / ((s + 1) sqrt((s + 1)^2 - (r s)^2))] - mu^2.
    (Checked against 2-D Gauss-Hermite quadrature to 1e-9.)
    """
    _require_zero_mean(x, "gelu")
    s, r = x.var, x.corr
    a = s / (1.0 + s)
    mean = math.sqrt(s * a / (2.0 * math.pi))
    var = (
        s / (2.0 * math.pi) * (math.pi - a - math.acos(a) + 2.0 * a * math.sqrt((1 - a) / (1 + a)))
    )
    tail = s * (s * (1 - r * r) + 1 + r * r) / ((s + 1) * math.sqrt((s + 1) ** 2 - (r * s) ** 2))
    cov = s / 4.0 * (r + 2.0 / math.pi * (r * math.asin(r * a) + tail)) - mean**2
    return Signal(mean, var, _corr(cov, var))


def gelu_backward(x: Signal, g: Grad) -> Grad:
    """g_in = GeLU'(x) g, GeLU'(x) = Phi(x) + x phi(x) (T1.4); s = s_x^2, a = s/(1 + s).

    s_gin^2 = s_g^2 [1/2 + (-arccos a + a (5s + 3)/(1 + 2s)^{3/2}) / (2 pi)]  (s -> 0: s_g^2/4);
    Cov_gin = r_g s_g^2 [1/2 + (-arccos(r a)
              + r a ((s + 1)(2s + 3) - 2 (r s)^2) / ((s + 1)^2 - (r s)^2)^{3/2}) / (2 pi)].
    """
    _require_zero_mean(x, "gelu")
    s, r = x.var, x.corr
    a = s / (1.0 + s)
    var = g.var * (0.5 + (-math.acos(a) + a * (5 * s + 3) / (1 + 2 * s) ** 1.5) / (2 * math.pi))
    num = r * a * ((s + 1) * (2 * s + 3) - 2 * (r * s) ** 2)
    factor = 0.5 + (-math.acos(r * a) + num / ((s + 1) ** 2 - (r * s) ** 2) ** 1.5) / (2 * math.pi)
    return Grad(var, _corr(factor * g.cov, var))


ACTIVATIONS = {"relu": (relu_forward, relu_backward), "gelu": (gelu_forward, gelu_backward)}

# -------------------------------------------------------------------------------------- norms


def _hyp2f1_half_half(c: float, z: float) -> float:
    """2F1(1/2, 1/2; c; z) by its power series (0 <= z < 1, c > 1)."""
    total, term, n = 1.0, 1.0, 0
    while abs(term) > 1e-17 * total and n < 10_000:
        term *= (0.5 + n) ** 2 / ((c + n) * (n + 1)) * z
        total += term
        n += 1
    return total


def mean_cosine(r: float, k: int) -> float:
    """E[cos(u, v)] for u, v in R^k with i.i.d. N(0, 1) pairs of correlation r (exact).

    = r (Gamma((k+1)/2)/Gamma(k/2))^2 (2/k) 2F1(1/2, 1/2; k/2 + 1; r^2) (the moments of the
    uncentred sample correlation; Hotelling 1953) ~= r (1 - (1 - r^2)/(2k)).
    """
    if r >= 1.0:
        return 1.0
    ratio = math.exp(2.0 * (math.lgamma((k + 1) / 2) - math.lgamma(k / 2)))
    return r * ratio * (2.0 / k) * _hyp2f1_half_half(k / 2 + 1.0, r * r)


def layernorm_forward(x: Signal, *, d: int, eps: float = 0.0) -> Signal:
    """LayerNorm over d features, gain 1, bias 0, any input mean (T1.5).

    Per token, u = P x (P = I - 11^T/d removes the mean; u ~ s N(0, P)), y = u/sqrt(v + eps) with
    v = |u|^2/d ~ s^2 chi^2_{d-1}/d. sum_f y_f = 0, so mu_y = 0; sum_f y_f^2 = d v/(v + eps), so
    s_y^2 = E[v/(v + eps)] ~= v0/(v0 + eps), v0 = s^2 (1 - 1/d) (= 1 for eps = 0).
    Inter-token covariance of one feature: E[y_if y_jf] = E[u_i.u_j/(|u_i||u_j|)] s_y^2, the mean
    cosine of two correlated Gaussian vectors in the (d-1)-dim range of P (their coordinates have
    correlation r_x). So r_y = mean_cosine(r_x, d - 1) = r_x (1 - (1 - r_x^2)/(2(d - 1))) + ...
    Choice (ours): this exact value. The paper's r_x (1 - 1/d) mis-takes the centring of the
    numerator, r_x (1 - 1/d) s^2, for a change of correlation: the biased per-token variance
    divides it out; the O(1/d) remainder is the finite-d bias of a sample cosine.
    """
    v0 = x.var * (1.0 - 1.0 / d)
    var = v0 / (v0 + eps)
    return Signal(0.0, var, mean_cosine(x.corr, d - 1))


def layernorm_feature_cov(x: Signal, *, d: int, eps: float = 0.0) -> float:
    """Covariance of two different features of one token: -s_y^2/(d - 1), exactly (T1.5).

    (sum_f y_f = 0 and sum_f y_f^2 = d s_y^2 per token.)
    """
    return -layernorm_forward(x, d=d, eps=eps).var / (d - 1)


def layernorm_backward(x: Signal, g: Grad, *, d: int, eps: float = 0.0) -> Grad:
    """g_in = J^T g with J = (P - y y^T/d)/sigma, sigma^2 = v + eps (T1.5, finite d: ours).

    M = P - y y^T/d is the projection orthogonal to 1 and y (rank d - 2), so
    E|g_in|^2 = s_g^2 (d - 2) E[1/sigma^2] and E[1/v] = d/(s^2 (d - 3)) (inverse chi^2_{d-1}):
        s_gin^2 = s_g^2 (d - 2) / (s^2 (d - 3) + d eps)          (paper: s_g^2/s^2).
    Two tokens: tr(M_i M_j) = d - 3 + cos^2(u_i, u_j) and, by the delta method,
    E[1/(|u_i||u_j|)] = 1/(s^2 (d - 5/2 - r^2/2)) + O(d^-3), so
        Cov_gin = r_g s_g^2 (d - 3 + r^2) / (s^2 (d - 5/2 - r^2/2) + d eps)  (paper: r_g s_g^2/s^2).
    """
    r, s2 = x.corr, x.var
    var = g.var * (d - 2) / (s2 * (d - 3) + d * eps)
    cov = g.cov * (d - 3 + r * r) / (s2 * (d - 2.5 - r * r / 2) + d * eps)
    return Grad(var, _corr(cov, var))


def _rms_moments(x: Signal, d: int) -> dict[str, float]:
    """Delta-method ingredients of q = |x|^2/d for two tokens (RMSNorm; ours).

    Per feature x ~ N(mu, s^2), two tokens with covariance c = r s^2:
    m = E q = mu^2 + s^2, n0 = E[x_i.x_j/d] = mu^2 + c,
    V = Var q = (4 mu^2 s^2 + 2 s^4)/d, C = Cov(q_i, q_j) = (4 mu^2 c + 2 c^2)/d,
    C_nq = Cov(x_i.x_j/d, q_i) = (2 mu^2 (s^2 + c) + 2 s^2 c)/d.
    """
    mu2, s2 = x.mean**2, x.var
    c = x.corr * s2
    return {
        "m": mu2 + s2,
        "n0": mu2 + c,
        "V": (4 * mu2 * s2 + 2 * s2 * s2) / d,
        "C": (4 * mu2 * c + 2 * c * c) / d,
        "C_nq": (2 * mu2 * (s2 + c) + 2 * s2 * c) / d,
    }


def rmsnorm_forward(x: Signal, *, d: int, eps: float = 0.0) -> Signal:
    """RMSNorm y = x/sqrt(q + eps), q = mean_f x_f^2, gain 1 (not in the paper: ours).

    No mean subtraction: the input mean survives. With the _rms_moments notation and
    kappa = m/(m + eps) (eps enters through the normaliser only, to first order):
      E y^2 = kappa exactly for eps = 0 (sum_f y_f^2 = d);
      mu_y = sqrt(kappa) E[x_f/sqrt(q)] = sqrt(kappa) mu/sqrt(m) [1 + s^2/(2 m d) - 3 s^4/(4 m^2 d)]
             (second-order delta method in (x_f, q), error O(d^-2));
      s_y^2 = kappa - mu_y^2   (-> s^2/m (1 - 1/d) for |mu| >> s: the within-token variance);
      E[y_if y_jf] = kappa E[x_i.x_j/(|x_i||x_j|)] = kappa [n0/m - C_nq/m^2 + n0 (3V + C)/(4 m^3)],
      Cov_y = that - mu_y^2  (mu = 0: r_y = r (1 - (1 - r^2)/(2d)), the sample-cosine bias).
    """
    k = _rms_moments(x, d)
    m, s2 = k["m"], x.var
    kappa = m / (m + eps)
    mean = math.sqrt(kappa / m) * x.mean * (1 + s2 / (2 * m * d) - 3 * s2 * s2 / (4 * m * m * d))
    var = kappa - mean**2
    cosine = k["n0"] / m - k["C_nq"] / m**2 + k["n0"] * (3 * k["V"] + k["C"]) / (4 * m**3)
    return Signal(mean, var, _corr(kappa * cosine - mean**2, var))


def rmsnorm_backward(x: Signal, g: Grad, *, d: int, eps: float = 0.0) -> Grad:
    """g_in = J^T g, J = (I - y y^T/d)/rho, rho = sqrt(q + eps), exactly (ours).

    For eps = 0, |y|^2 = d and M = I - y y^T/d projects out y (rank d - 1; no projection onto 1,
    unlike LayerNorm). With g independent of x:
      s_gin^2 = s_g^2 (1 - 1/d) E[1/rho^2],  E[1/rho^2] ~= (1/m')(1 + V/m'^2),  m' = m + eps.
    Two tokens: tr(M_i M_j) = d - 2 + cos^2(x_i, x_j). With a nonzero mean the two tokens' y are
    nearly parallel, cos ~= n0/m -> 1 (not r^2 as for centred inputs): the projection term is
    shared. E[1/(rho_i rho_j)] ~= (1/m')(1 + (3V + C)/(4 m'^2)), so
      Cov_gin = r_g s_g^2 (1 - (2 - (n0/m)^2)/d) (1/m')(1 + (3V + C)/(4 m'^2)).
    """
    k = _rms_moments(x, d)
    mp = k["m"] + eps
    var = g.var * (1 - 1 / d) / mp * (1 + k["V"] / mp**2)
    trace = 1 - (2 - (k["n0"] / k["m"]) ** 2) / d
    cov = g.cov * trace / mp * (1 + (3 * k["V"] + k["C"]) / (4 * mp**2))
    return Grad(var, _corr(cov, var))


def _inverse_root_moments(m: float, V: float, C: float) -> dict[str, float]:
    """Inverse moments of a mean-square statistic q with mean m, variance V and two tokens'
    covariance C (ours): "root" E q^(-1/2), "inv" E q^-1, "inv2" E q^-2, and the pair terms
    "pair" E (q_i q_j)^(-1/2), "pair2" E (q_i q_j)^-1.

    q is taken as Gamma(shape a = m^2/V, scale b = V/m) (exact for centred Gaussian features,
    q = s^2 chi^2_k/k: a = k/2; Satterthwaite's moment match otherwise), whose inverse moments are
    exact: E q^(-1/2) = Gamma(a - 1/2)/(Gamma(a) sqrt(b)), E q^-1 = 1/(b (a - 1)),
    E q^-2 = 1/(b^2 (a - 1)(a - 2)). A pair term interpolates between independent (C = 0) and
    identical (C = V) tokens linearly in C/V, which for "pair" is the delta method's
    (1/m)(1 + (3V + C)/(4 m^2)) to first order. Needed where q averages few features (pRMSNorm's
    k = 8 of 128): the second-order delta method misses E q^-1 by 2/k^2 relative there.
    """
    a, b = m * m / V, V / m
    root = math.exp(math.lgamma(a - 0.5) - math.lgamma(a)) / math.sqrt(b)
    inv = 1.0 / (b * (a - 1.0)) if a > 1.0 else math.inf
    inv2 = 1.0 / (b * b * (a - 1.0) * (a - 2.0)) if a > 2.0 else math.inf
    share = C / V
    return {
        "root": root,
        "inv": inv,
        "inv2": inv2,
        "pair": root**2 + share * (inv - root**2),
        "pair2": inv**2 + share * (inv2 - inv**2),
    }


def prmsnorm_forward(x: Signal, *, d: int, k: int, eps: float = 0.0) -> Signal:
    """Partial RMSNorm y = x/sqrt(q_k + eps), q_k = mean of x_f^2 over the first k of d features
    (Zhang & Sennrich 2019, sec. 4), gain 1 (ours).

    The k features inside the statistic are RMSNorm over k features (`rmsnorm_forward(d=k)`).
    A feature outside it is independent of q_k, so with the _rms_moments(x, k) notation and
    the inverse moments of q_k + eps from `_inverse_root_moments`:
      E y_f = mu E[(q_k + eps)^(-1/2)],  E y_f^2 = m E[1/(q_k + eps)],
      E[y_if y_jf] = n0 E[1/(rho_i rho_j)].
    The reported moments pool all d features (fractions k/d and 1 - k/d): mean, E y^2 - mean^2,
    E[y_i y_j] - mean^2. k = d is `rmsnorm_forward`.
    """
    inside = rmsnorm_forward(x, d=k, eps=eps)
    if k == d:
        return inside
    mom = _rms_moments(x, k)
    inv = _inverse_root_moments(mom["m"] + eps, mom["V"], mom["C"])
    f = k / d
    mean = f * inside.mean + (1 - f) * x.mean * inv["root"]
    sq = f * (inside.var + inside.mean**2) + (1 - f) * mom["m"] * inv["inv"]
    cross = f * (inside.corr * inside.var + inside.mean**2) + (1 - f) * mom["n0"] * inv["pair"]
    var = sq - mean**2
    return Signal(mean, var, _corr(cross - mean**2, var))


def prmsnorm_backward(x: Signal, g: Grad, *, d: int, k: int, eps: float = 0.0) -> Grad:
    """Backward of partial RMSNorm (ours): g_in = M^T g / rho with M = I - y a^T/k, y = x/rho
    and a = y on the first k features, 0 elsewhere (the statistic sees only those).

    For eps = 0, a.y = |a|^2 = k, so tr(M_i^T M_j) = d - 2 + (y_i.y_j)(a_i.a_j)/k^2 with
    y_i.y_j = a_i.a_j + x_out,i.x_out,j/(rho_i rho_j) (x_out: the d - k features outside the
    statistic, independent of rho). Writing a_i.a_j ~= k c (c = n0/m, the tokens' cosine as in
    `rmsnorm_backward`; c = 1 for i = j, n0 = m) and x_out,i.x_out,j ~= (d - k) n0, per feature
        Cov_gin = r_g s_g^2 [(d - 2 + c^2) E(rho_i rho_j)^-1 + c (d - k)(n0/k) E(rho_i rho_j)^-2]/d,
        s_gin^2 =   s_g^2 [(d - 1) E rho^-2 + (d - k)(m/k) E rho^-4] / d,
    with the inverse moments of rho^2 = q_k + eps from `_inverse_root_moments`. k = d gives the
    `rmsnorm_backward` forms.
    """
    mom = _rms_moments(x, k)
    inv = _inverse_root_moments(mom["m"] + eps, mom["V"], mom["C"])
    cosine = mom["n0"] / mom["m"]
    var = g.var * ((d - 1) * inv["inv"] + (d - k) * mom["m"] / k * inv["inv2"]) / d
    cross = cosine * (d - k) * mom["n0"] / k * inv["pair2"]
    cov = g.cov * ((d - 2 + cosine**2) * inv["pair"] + cross) / d
    return Grad(var, _corr(cov, var))


def scalenorm_forward(x: Signal, *, d: int, gain: float | None = None) -> Signal:
    """ScaleNorm y = g x/|x|_2 (Nguyen & Salazar 2019), g initialised to sqrt(d) (ours).

    g x/|x| = (g/sqrt(d)) x/sqrt(q): ScaleNorm is RMSNorm without eps scaled by g/sqrt(d), so at
    init (g = sqrt(d)) the maps are those of `rmsnorm_forward` with eps = 0.
    """
    y = rmsnorm_forward(x, d=d)
    scale = (gain if gain is not None else math.sqrt(d)) / math.sqrt(d)
    return Signal(scale * y.mean, scale**2 * y.var, y.corr)


def scalenorm_backward(x: Signal, g: Grad, *, d: int, gain: float | None = None) -> Grad:
    """Backward of ScaleNorm: (g/sqrt(d))^2 times `rmsnorm_backward` with eps = 0 (ours)."""
    gi = rmsnorm_backward(x, g, d=d)
    scale = (gain if gain is not None else math.sqrt(d)) / math.sqrt(d)
    return Grad(scale**2 * gi.var, gi.corr)


# ------------------------------------------------------------------------------------ softmax

SOFTMAX_FORMS = ("approx", "full", "paper_approx", "paper_full")


def _softmax_output_var(s2: float, length: int, form: str) -> float:
    L, w = length, math.exp(s2)
    if form == "paper_approx":
        return (w - 1.0) / L**2
    if form == "approx":
        return (w - 1.0) * (L - 1) / L**3
    if form == "full":
        return (w - 1.0) / L**2 * (1.0 - (1.0 + (w - 1.0) * (2.0 * w + 1.0)) / L)
    if form == "paper_full":
        e = math.exp(s2 * L / (L - 1))
        return (e - 1.0) * e * e / ((L - 1) * w + 1.0) ** 2
    raise ValueError(f"unknown softmax form {form!r}; accepted: {', '.join(SOFTMAX_FORMS)}")


def softmax_forward(x: Signal, *, length: int, form: str = "full") -> Signal:
    """Softmax over L = `length` zero-mean logits of variance s^2 and correlation r (T1.6).

    The shared part of the logits cancels: only sigma^2 = (1 - r) s^2 matters; w = e^{sigma^2}.
    With eps_j = e^{x_j}/E[e^x] - 1 (mean 0, variance w - 1, third moment (w - 1)^2 (w + 2)),
    y_i - 1/L = (eps_i - mean(eps))/(L (1 + mean(eps))) exactly. mu_y = 1/L; s_y^2 by `form`:
      "full" (ours): (w - 1)/L^2 [1 - (1 + (w - 1)(2w + 1))/L], expanding 1/(1 + mean(eps))^2 to
          second order: error O(1/L^2); exact as sigma -> 0 (sigma^2 (L - 1)/L^3).
      "approx" (ours): (w - 1)(L - 1)/L^3, the paper's V1 with the centring factor (L - 1)/L that
          makes it exact as sigma -> 0 (first order in w - 1).
      "paper_approx" (paper V1): (w - 1)/L^2.
      "paper_full" (paper V2): (E - 1) E^2/((L - 1) w + 1)^2, E = exp(sigma^2 L/(L - 1)).
    Both paper forms overestimate at O(1/L) (V2's finite-L term has the wrong sign: it tends to
    sigma^2/(L (L - 1))): at L = 300, sigma -> 0, V1 is +0.3% and V2 +0.7% off; at sigma^2 = 1,
    +3.5% and +5%. These biases are the authors' printed percentiles (0.5/0.9 at p90).
    sum_i y_i = 1, so the covariance of two logits' outputs is -s_y^2/(L - 1): r_y = -1/(L - 1).
    """
    var = _softmax_output_var((1.0 - x.corr) * x.var, length, form)
    return Signal(1.0 / length, var, -1.0 / (length - 1))


def softmax_backward(x: Signal, g: Grad, *, length: int, form: str = "full") -> Grad:
    """g_in = y * (g - y.g) (Jacobian diag(y) - y y^T) (T1.6).

    A component of g shared by all logits cancels, so s_g^2 enters as (1 - r_g) s_g^2 (the paper
    has r_g = 0). E g_in,i^2 = (1 - r_g) s_g^2 E[y_i^2 (1 - 2 y_i + |y|^2)], i.e. times
      "paper_approx"/"paper_full" (paper): s_y^2 + 1/L^2, s_y^2 of that form (V1: w/L^2);
      "approx" (ours): w (L - 1)/L^3 (V1 with the centring factor; exact as sigma -> 0);
      "full" (ours): s_y^2 + 1/L^2 - 2 E y_i^3 + E[y_i^2 |y|^2], the last two ~= (w^2 - 2 w^3)/L^3.
    sum_i g_in,i = 0, so r_gin = -1/(L - 1).
    """
    L = length
    w = math.exp((1.0 - x.corr) * x.var)
    second = softmax_forward(x, length=L, form=form).var + 1.0 / L**2
    if form == "approx":
        second = w * (L - 1) / L**3
    if form == "full":
        second += (w * w - 2.0 * w**3) / L**3
    return Grad((1.0 - g.corr) * g.var * second, -1.0 / (L - 1))


# ------------------------------------------------------------------------- FFN block, residual


def ffn_forward(
    x: Signal,
    *,
    d: int,
    d_ff: int,
    sigma_1: float,
    sigma_2: float,
    activation: str = "relu",
    p: float = 0.0,
) -> Signal:
    """FFN block dropout_p(act(x W1) W2), W1: d -> d_ff (std sigma_1), W2: d_ff -> d (T1.9).

    Composition of linear -> activation -> linear -> dropout. For relu, d_ff = 4d, unit input:
    s_y^2 = 2 d^2 sigma_1^2 sigma_2^2 s_x^2/(1 - p) (+ mean terms), as in T1.9.
    """
    act_forward, _ = ACTIVATIONS[activation]
    h = linear_forward(x, d_in=d, d_out=d_ff, sigma_w=sigma_1)
    out = linear_forward(act_forward(h), d_in=d_ff, d_out=d, sigma_w=sigma_2)
    return dropout_forward(out, p=p)


def ffn_backward(
    x: Signal,
    g: Grad,
    *,
    d: int,
    d_ff: int,
    sigma_1: float,
    sigma_2: float,
    activation: str = "relu",
    p: float = 0.0,
) -> Grad:
    """Backward of `ffn_forward`, composed in reverse (T1.9): for relu the gain is
    d sigma_2^2 (W2^T) * 1/2 (relu') * d_ff sigma_1^2 (W1^T) / (1 - p) = 2 d^2 s1^2 s2^2/(1 - p)."""
    act_forward, act_backward = ACTIVATIONS[activation]
    h = linear_forward(x, d_in=d, d_out=d_ff, sigma_w=sigma_1)
    a = act_forward(h)
    out = linear_forward(a, d_in=d_ff, d_out=d, sigma_w=sigma_2)
    g_out = dropout_backward(out, g, p=p)
    g_a = linear_backward(a, g_out, d_in=d_ff, d_out=d, sigma_w=sigma_2)
    return linear_backward(x, act_backward(h, g_a), d_in=d, d_out=d_ff, sigma_w=sigma_1)


def residual_forward(x: Signal, *, f: Signal, lam: float, beta: float) -> Signal:
    """x' = lam x + beta f, block output f independent of x (T1.9).

    mu' = lam mu_x + beta mu_f; s'^2 = lam^2 s_x^2 + beta^2 s_f^2;
    Cov' = lam^2 r_x s_x^2 + beta^2 r_f s_f^2.
    """
    var = lam**2 * x.var + beta**2 * f.var
    return Signal(lam * x.mean + beta * f.mean, var, _corr(lam**2 * x.cov + beta**2 * f.cov, var))


def residual_backward(x: Signal, g: Grad, *, g_block: Grad, lam: float, beta: float) -> Grad:
    """dL/dx = lam g + beta J_f^T g (T1.9); `g_block` = the block's backward map applied to g
    (unscaled). The two paths are taken as uncorrelated:
    s_gin^2 = lam^2 s_g^2 + beta^2 s_gb^2, Cov = lam^2 r_g s_g^2 + beta^2 r_gb s_gb^2."""
    del x
    var = lam**2 * g.var + beta**2 * g_block.var
    return Grad(var, _corr(lam**2 * g.cov + beta**2 * g_block.cov, var))
