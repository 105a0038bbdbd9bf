r"""Position-resolved attention maps: (L, L) token covariances through softmax attention.

The mean-field maps of attention.py take every token alike (one variance, one correlation).
In a causal stack the first tokens differ from the rest (token 0 attends to itself only, and
every row's gradient reaches it), and a sparse loss (the masked positions of an MLM) gives
position-dependent gradients. The maps here act on (L, L) token covariances within a sequence
and between the tokens of two sequences, through the tilted mean attention of keys that are
not exchangeable (`key_tilts`) and the exchangeable theory's fluctuations (attention.py's
`Head`: its pair functionals, row variances and query/key path weights). For a uniform
correlation they reduce to the mean-field maps (tests/theory/test_model_measure.py).
theory/sublayer.py and theory/weight_gradients.py use them.
"""

from __future__ import annotations

import numpy as np

from deepscale_jax.theory.attention import Head, keys_seen, mha_head
from deepscale_jax.theory.measure import Signal


def key_tilts(
    corr: np.ndarray, v_z: float, causal: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Mean attention and second-moment tilts of keys that are not exchangeable.

    In a causal stack the first tokens are less correlated with the rest (their attention
    output is their own value, not an average), so their keys carry more key-specific logit
    variance: row i's logits z_ij = q_i.k_j / sqrt(d_k) minus their row mean (softmax is blind
    to it) have variance tau_ij = V_z C_jj^(i), C^(i) the input correlation matrix `corr`
    centred over the n_i keys row i sees: C_jj^(i) = 1 - 2 mean_k corr_jk + mean_kl corr_kl.
    Exchangeable keys give the common tau of attention.py's docstring; here the keys differ by
    Delta_ij = tau_ij - mean_j tau_ij. For a row of many keys the normalizer concentrates,
    S = sum_k e^(z_k) ~ sum_k e^(tau_ik/2), so (log-normal e^z)
        E A_ij = t_ij / sum_k t_ik,    t_ij = e^(Delta_ij/2),
        E A_ij^2 = e^(2 tau_ij) / S^2 = (M2_i/n_i) t2_ij,   t2_ij = e^(2 Delta_ij) / mean_k(t_ik)^2,
    the second written relative to the exchangeable E A_ij^2 = M2_i/n_i (which keeps the exact
    short-row functionals; at Delta = 0 both reduce to the exchangeable moments). Measured on
    the 48-layer xavier Pre-LN LM (layer 10, row 127): n E A_i0 = 3.4 and n E A_i0^2 / M2 ~ 30,
    the exchangeable values being 1 and 1. Returns (E A, t2, C^(i)_jj) as (L, L) arrays, zero
    on unseen keys.
    """
    corr = np.asarray(corr, float)
    length = corr.shape[0]
    n = keys_seen(length, causal)
    if causal:
        seen = np.tril(np.ones((length, length)))
        row_mean = (np.cumsum(corr, axis=1) / n).T  # [i, j] = mean_{k <= i} corr_jk
        total = np.cumsum(np.cumsum(corr, axis=0), axis=1).diagonal() / n**2
    else:
        seen = np.ones((length, length))
        row_mean = np.tile(corr.mean(axis=1), (length, 1))
        total = np.full(length, corr.mean())
    centred = np.maximum(np.diag(corr)[None, :] - 2 * row_mean + total[:, None], 0.0) * seen
    tau = v_z * centred
    delta = (tau - tau.sum(axis=1, keepdims=True) / n[:, None]) * seen
    tilt = np.exp(delta / 2) * seen
    tilt_mean = tilt.sum(axis=1) / n
    tilt2 = np.exp(2 * delta) * seen / tilt_mean[:, None] ** 2
    return tilt / tilt.sum(axis=1, keepdims=True), tilt2, centred


def forward_covariance(head: Head, corr: np.ndarray) -> np.ndarray:
    """(L, L) covariance of the context A V for input tokens of correlation matrix `corr`.

    Cov(v_k, v_l) = s_v^2 corr_kl, so E c_i c_j = s_v^2 sum_kl E[A_ik A_jl] corr_kl. Split
    E[A_ik A_jl] into the mean attention (tilted, `key_tilts`) and its fluctuation: the
    first gives s_v^2 (Abar corr Abar^T)_ij; the second is taken from the exchangeable
    theory, i.e. `Head.row_variances` (diagonal) and `Head.forward`'s pair term (off it) minus their
    mean-attention part at uniform correlation r, s_v^2 (r + (1 - r)/n_max):
        fluct_ii = row_variances_i - s_v^2 (r + (1-r)/n_i),
        fluct_ij = s_v^2 (1 - r) [K_ij/n_max - 1/n_max + r coh_i coh_j],
    so a uniform `corr` = r gives back the mean-field moments, while a row whose keys are
    less correlated (the first tokens) gets the smaller shared part they really have."""
    r, sv2, length = head.r, head.proj_var(head.sigma_v), head.length
    n = keys_seen(length, head.causal)
    mean_attention = key_tilts(corr, head.logit_scale, head.causal)[0]
    out = sv2 * mean_attention @ np.asarray(corr, float) @ mean_attention.T
    n_max = np.maximum(n[:, None], n[None, :])
    coh = np.sqrt(np.maximum(head.f["Z2"] - head.f["M2"], 0.0) / head.d_in)
    fluct = head.pair_overlap() - (1.0 - np.eye(length)) / n_max + r * np.outer(coh, coh)
    np.fill_diagonal(fluct, 0.0)
    diag = head.row_variances() - sv2 * (r + (1 - r) / n)
    return out + sv2 * (1 - r) * fluct + np.diag(diag)


def projection_gradients(
    head: Head, cov: np.ndarray, corr: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Position-resolved gradients of the head's values, queries and keys (per element)
    from the (L, L) token covariance `cov` of the context gradient (any token structure):
    "value" the (L, L) token covariance of dV, "query" and "key" the per-token variances of
    dQ and dK (taken as uncorrelated across tokens, the r_g = 0 forms of `Head.backward`).

    Value path: dV_j = sum_i A_ij g_i with E A_ij = 1/n_i on the n_i keys row i sees (keys
    exchangeable), so Cov dV = Abar^T cov Abar, plus the attention-weight fluctuation
    E A_ij^2 - Abar_ij^2 = (M2_i/(1-p) - 1/n_i)/n_i on the diagonal; its part without dropout,
    (M2_i - 1/n_i)/n_i, is that of weights summing to 1 over the row, with the matching
    negative covariance off the diagonal (`zero_sum_off_diagonal`). Query path: row i's
    own gradient, at token i; key path: row i's weight spread over the keys it sees. In a
    causal stack this is what sets the first tokens apart: token 0 is seen by every row,
    and every row's gradient reaches it.

    With `corr`, the (L, L) correlation matrix of the head's input tokens, keys are no longer
    exchangeable (`key_tilts`): E A = the tilted mean attention, E A_ij^2 = (M2_i/n_i) t2_ij,
    and the key path's share of row i goes to key j in proportion to E A_ij^2 times the
    variance of its centred value: dZ_ij = P_ij g_i.(v_j - vbar_i), whose value part has
    variance s_v^2 C_jj^(i) (the centred correlation of `key_tilts`) where exchangeable keys
    have s_v^2 (1 - r)(1 - 1/n_i) (the (1 - r) of c_p, the 1 - 1/n_i of the centring in F1).
    Measured on the 48-layer xavier Pre-LN LM, layer 10: token 0's key-path gradient is ~10x
    the exchangeable value (C_00^(127) = 0.70 against 1 - r = 0.11). Without `corr` the
    tokens are exchangeable at the head's r (the untilted attention).

    Pairs of rows i != i' with correlated gradients add on the keys both favour, as in
    `Head.backward`'s r_g K sums: the value path through the rows' covarying weights
    (`row_pair_fluctuation`), the key path through their shared query direction (weights
    times corr_ii' + `query_tilt`, times `key_pair_factor`). On a bidirectional stream with
    dropout (r = 0.87, r_g = 0.54, d = 128, 4 heads) the two are 0.30 and 0.09 of the
    measured gradient variance 1.55 (attention_sweeps.MHACase); with them the mean
    diagonal of the map is 1.52, the mean-field `Head.backward`'s, where it was 1.14.
    """
    f, r, p, d_k, d_in, length = head.f, head.r, head.p, head.d_k, head.d_in, head.length
    sq2, sk2, sv2 = (head.proj_var(s) for s in (head.sigma_q, head.sigma_k, head.sigma_v))
    m2, om1, om2 = f["M2"], *head.omegas
    c_p = (1 - r + r * p) / (1 - p)
    n = keys_seen(length, head.causal)
    own = np.diag(cov)
    if corr is None:  # exchangeable tokens: the untilted attention (key_tilts of uniform r)
        corr = r + (1 - r) * np.eye(length)
    mean_attention, tilt2, centred = key_tilts(corr, head.logit_scale, head.causal)
    second = tilt2 * (m2 / n)[:, None]
    fluctuation = second / (1 - p) - mean_attention**2
    value = (
        mean_attention.T @ cov @ mean_attention
        + np.diag(fluctuation.T @ own)
        + zero_sum_off_diagonal(second - mean_attention**2, own)
        + row_pair_fluctuation(head, mean_attention, cov)
    )
    second_share = second / second.sum(axis=1, keepdims=True)
    exchangeable = np.maximum((1 - r) * (1 - 1 / n), 1e-12)[:, None]
    share = second_share * np.where(n[:, None] > 1, centred / exchangeable, 1.0)
    weights = mean_attention * np.sqrt(centred)
    shared = (np.asarray(corr, float) + head.query_tilt) * cov * key_pair_factor(head)
    np.fill_diagonal(shared, 0.0)
    key_pairs = sq2 * sv2 * np.einsum("ij,ik,kj->j", weights, shared, weights)
    key_rows = sq2 * sv2 * c_p * f["F1q"] * np.divide(om1, m2)
    query_rows = (sk2 * (1 - r) * sv2 / d_k) * (
        c_p * ((d_k - 1) * f["F1"] * np.divide(om2, m2) + f["F3"])
        + (1 - r) * (d_k / d_in) * f["F2"]
    )
    key = share.T @ (key_rows * own) + key_pairs
    return {
        "value": value,
        "query": query_rows * own,
        "key": key,
        "value_key": value_key_cross(head, cov, mean_attention, second_share),
    }


def value_key_cross(
    head: Head, cov: np.ndarray, mean_attention: np.ndarray, second_share: np.ndarray
) -> np.ndarray:
    """Per token j, 2 E[dV_j . W_v^T W_k dK_j] / (d_k sigma_v^2), per element: the value-key
    cross term of `Head.backward` (attention.py, step 4) position-resolved. Row i's own term
    (`Head.value_key_own`, weight cov_ii) is spread over its keys as E A_ij^2
    (`second_share`: row i's E A_i.^2 normalized), a pair of rows' term
    (`Head.value_key_pairs`, weight cov_ii') over the keys both see as Abar_ij Abar_i'j /
    S_ii' (`per_shared_overlap`), as `row_pair_fluctuation` spreads their overlap. Like the key
    path it sums to 0 over the tokens; `backward_covariance` adds its part off the diagonal
    (`zero_sum_covariance`)."""
    own = head.value_key_own() * np.diag(cov)
    w = per_shared_overlap(np.asarray(cov, float) * head.value_key_pairs(), mean_attention)
    shared = np.einsum("ij,ik,kj->j", mean_attention, w, mean_attention)
    return 2.0 / head.d_in * (second_share.T @ own + shared)


def per_shared_overlap(pair_values: np.ndarray, mean_attention: np.ndarray) -> np.ndarray:
    """(L, L) pair_values_ii' / S_ii' for rows i != i', S_ii' = sum_j Abar_ij Abar_i'j the
    mean attention's overlap of the two rows (0 on the diagonal and where the rows share no
    key): a pair term per unit of overlap, to spread over the keys both rows see in proportion
    to Abar_ij Abar_i'j."""
    overlap = mean_attention @ mean_attention.T
    w = np.divide(pair_values, overlap, out=np.zeros_like(pair_values), where=overlap > 0)
    np.fill_diagonal(w, 0.0)
    return w


def key_pair_factor(head: Head) -> np.ndarray:
    """(L, L) per pair of rows i != i': the centred key overlap of `Head.pairs`,
    (K_ii' - G3_i - G3_i' + K_ii'^2/n_max)/n_max with G3 = M2^(1-rho) (n M3)^rho, over its
    uniform-attention value (1 - 1/n_max)/n_max: how much more two rows' key-path
    gradients add on the keys both favour than the mean attention says. 1 at tau = 0."""
    f, rho, length = head.f, head.rho, head.length
    n = keys_seen(length, head.causal)
    n_max = np.maximum(n[:, None], n[None, :])
    k = head.pair_overlap() * n_max
    g3 = f["M2"] ** (1 - rho) * (n * f["M3"]) ** rho
    centred = k - g3[:, None] - g3[None, :] + k**2 / n_max
    factor = np.divide(centred, 1 - 1 / n_max, out=np.ones_like(k), where=n_max > 1)
    np.fill_diagonal(factor, 0.0)
    return np.maximum(factor, 0.0)


def row_pair_fluctuation(head: Head, mean_attention: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """The value gradient's (L, L) covariance from the attention weights of two different
    rows covarying on the keys both see: sum_{i != i'} cov_ii' Cov(A_i., A_i'.).

    Two rows' logits on one key share the key's component (correlation rho, attention.py step 2), so
    E sum_j A_ij A_i'j = K_ii'/n_max (`Head.pair_overlap`) exceeds the mean attention's
    S_ii' = sum_j Abar_ij Abar_i'j (1/n_max untilted) by e_ii' = (K_ii' - 1)/n_max: a key
    that both rows favour collects both rows' gradients. `Head.backward`'s value path has this
    as its r_g K pair sum. Position-resolved, the excess is spread over the shared keys in
    proportion to Abar_ij Abar_i'j, D = diag(e_ii' Abar_i o Abar_i' / S_ii'), and each
    row's weights sum to 1, so Cov(A_i., A_i'.) = Pi_i D Pi_i'^T with Pi_i = I - Abar_i 1^T
    (its rows and columns sum to 0: the column sum sum_j dV_j = sum_i g_i is untouched).
    With W = cov o e / S (zero diagonal) the sum over row pairs is
        diag(Abar^T W Abar) - Abar^T (Abar o W Abar) - (Abar o W^T Abar)^T Abar
        + Abar^T (cov o e) Abar.
    Left out, a bidirectional stack with dropout (token correlation 0.87, gradient
    correlation 0.54, d = 128, 4 heads) loses 0.30 of the measured 1.55 gradient variance
    of the attention branch; at r -> 1 (tau -> 0) K -> 1 and the term vanishes."""
    length = head.length
    n = keys_seen(length, head.causal)
    excess = head.pair_overlap() - (1.0 - np.eye(length)) / np.maximum(n[:, None], n[None, :])
    weighted = np.asarray(cov, float) * excess
    w = per_shared_overlap(weighted, mean_attention)
    spread = mean_attention * (w @ mean_attention)
    diagonal = np.einsum("ij,ik,kj->j", mean_attention, w, mean_attention)
    return (
        np.diag(diagonal)
        - mean_attention.T @ spread
        - spread.T @ mean_attention
        + mean_attention.T @ weighted @ mean_attention
    )


def backward_covariance(head: Head, cov: np.ndarray, corr: np.ndarray | None = None) -> np.ndarray:
    """Position-resolved `Head.backward`: the (L, L) token covariance of dLoss/dX through this
    head, dX = W_v dV + W_q dQ + W_k dK (`projection_gradients`) plus the value-key cross
    term. The key path and the cross term sum to 0 over the tokens (softmax rows sum to 1:
    sum_j dK_j = 0), so their covariance is `zero_sum_covariance` of their variances."""
    grads = projection_gradients(head, cov, corr)
    fan = lambda sigma: head.d_k * sigma**2
    zero_sum = fan(head.sigma_k) * grads["key"] + fan(head.sigma_v) * grads["value_key"]
    return (
        fan(head.sigma_v) * grads["value"]
        + np.diag(fan(head.sigma_q) * grads["query"])
        + zero_sum_covariance(zero_sum)
    )


def zero_sum_covariance(variances: np.ndarray) -> np.ndarray:
    """The (L, L) covariance of token vectors that sum to 0, from their variances k_j:
    `zero_sum_off_diagonal` of one family. Equal variances give the exchangeable -k/(L-1),
    the mean-field `Head.backward`'s covariance of the key path. On the diagonal alone, the
    gradient correlation of a bidirectional Post-LN stack (d = 256, r = 0.87, r_g = 0.5)
    came out 0.0023 above the mean-field map's."""
    k = np.asarray(variances, float)
    return np.diag(k) + zero_sum_off_diagonal(k[None, :], np.ones(1))


def zero_sum_off_diagonal(variances: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_f weights_f C_f off the diagonal, C_f the covariance of a family f of token
    vectors that sum to 0 with variances k_fj (rows of `variances`): -k_fj k_fj' / (S_f -
    Q_f/S_f) (S = sum_j k_fj, Q = sum_j k_fj^2), so each family's entries sum to 0 exactly
    and its rows nearly (row j to k_j (k_j - Q/S)/(S - Q/S)); exact for equal variances,
    -k/(L-1)."""
    k = np.asarray(variances, float)
    total = k.sum(axis=1)
    safe_total = np.where(total > 0, total, 1.0)
    spread = total - np.sum(k * k, axis=1) / safe_total  # sum_(j != j') k_j k_j' / S
    # a family with all its variance on one token (or none) has no off-diagonal part
    usable = (total > 0) & (spread > 1e-12 * np.abs(total))
    scale = np.where(usable, weights / np.where(usable, spread, 1.0), 0.0)
    off = -k.T @ (scale[:, None] * k)
    np.fill_diagonal(off, 0.0)
    return off


def mha_cross_covariance(
    x: Signal, cross: np.ndarray, corr: np.ndarray, *, d: int, heads: int, L: int,
    sigma_q: float, sigma_k: float, sigma_v: float, sigma_o: float, p_attn: float, causal: bool,
) -> np.ndarray:  # fmt: skip
    """`mha_cross_forward` for the (L, L) covariance `cross` between the tokens of two different
    sequences (whose own token correlation is `corr`): each sequence attends through its
    mean attention (tilted, `key_tilts`) independently of the other, so
    d sigma_o^2 d sigma_v^2 Abar (cross + x.mean^2) Abar^T. A uniform `cross` passes whole (rows
    sum to 1); the part of it that differs by position does not: the first tokens of a causal
    stack, which the early rows weight most, share less with the other sequences (measured,
    48 xavier Pre-LN layers: the attention passes 1-17% less of the covariance between
    sequences than of the covariance within one)."""
    head = mha_head(x, d, heads, L, sigma_q, sigma_k, sigma_v, p_attn, causal)
    a = key_tilts(corr, head.logit_scale, causal)[0]
    return d * sigma_o**2 * d * sigma_v**2 * a @ (np.asarray(cross, float) + x.mean**2) @ a.T


def mha_backward_cross(
    x: Signal, cov: np.ndarray, *, d: int, heads: int, L: int, sigma_q: float, sigma_k: float,
    sigma_v: float, sigma_o: float, p_attn: float, causal: bool,
) -> np.ndarray:  # fmt: skip
    """(L, L) cross-sequence covariance of dLoss/dx of `MultiHeadAttention` from that of its
    output gradient: the value path through the mean attention of each sequence,
    d sigma_v^2 Abar^T (d sigma_o^2 cov) Abar (the query/key paths and the attention-weight
    fluctuations are independent between sequences)."""
    head = mha_head(x, d, heads, L, sigma_q, sigma_k, sigma_v, p_attn, causal)
    a = head.mean_attention
    return d * sigma_v**2 * a.T @ (d * sigma_o**2 * np.asarray(cov, float)) @ a


def mha_backward_covariance(
    x: Signal, cov: np.ndarray, *, d: int, heads: int, L: int, sigma_q: float, sigma_k: float,
    sigma_v: float, sigma_o: float, p_attn: float, causal: bool,
    corr: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """(L, L) token covariance of dLoss/dx of `MultiHeadAttention` from that of its output
    gradient (`backward_covariance`; W_o^T multiplies it by d sigma_o^2, heads add);
    `corr` the input's (L, L) token correlation matrix (`key_tilts`), if known."""
    head = mha_head(x, d, heads, L, sigma_q, sigma_k, sigma_v, p_attn, causal)
    return heads * backward_covariance(head, d * sigma_o**2 * np.asarray(cov, float), corr)


def mha_forward_covariance(
    x: Signal, corr: np.ndarray, *, d: int, heads: int, L: int, sigma_q: float,
    sigma_k: float, sigma_v: float, sigma_o: float, p_attn: float, causal: bool,
) -> np.ndarray:  # fmt: skip
    """(L, L) token covariance of the output of `MultiHeadAttention` on input x whose tokens have
    the correlation matrix `corr` (`forward_covariance`; W_o and the heads multiply it by
    H d_head sigma_o^2)."""
    head = mha_head(x, d, heads, L, sigma_q, sigma_k, sigma_v, p_attn, causal)
    return heads * head.d_k * sigma_o**2 * forward_covariance(head, corr)
