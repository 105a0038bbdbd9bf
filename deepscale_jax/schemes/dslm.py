"""DeepScaleLM (Kedia et al., "Transformers Get Stable", ICML 2024, arXiv 2403.09635).

Every block is initialised to map unit-variance input to unit-variance output, and the residual
merges keep the stream at unit variance (shared/reference/theory.md sec. 2; p = model.dropout,
d = model.d_model, all weights normal):
- embeddings: the k summed tables (token + learned positions: k = 2; k = 1 with sinusoidal or no
  positions, whose fixed table is not compensated) each N(0, (1-p)/k): the sum has variance 1-p
  and 1 after the embedding dropout (theory.md 2.1; the authors sum k = 3 tables);
- q, k (self and cross): sqrt(1/d), so q and k entries and the logits (after 1/sqrt(d_head)) have
  unit variance (2.1);
- v and attention output of layer l: sigma_vo[l] = sqrt(sqrt((1-p)/r_l)/d), from
  d^2 sigma_v^2 sigma_o^2 r_l/(1-p) = 1, the attention block's gain in the uniform-attention limit
  (1.9, 2.1), where r_l is the inter-token correlation at layer l's input given by the recursion
  of 2.2 (`correlation_table`; sigma_v = sigma_o as the authors);
- FFN, both matrices sigma_f: the FFN block (with its hidden dropout) has gain 1, solved through
  theory/components.py's `ffn_forward` for the configured activation (`ffn_std`). For ReLU this
  is d d_ff sigma_f^4 / (2 (1-p)) = 1, sigma_f^2 = sqrt(2 (1-p)/(d d_ff)): the authors'
  sqrt((1-p)/2)/d at d_ff = 4d (their 2 d^2 sigma_1^2 sigma_2^2/(1-p) = 1 with sigma_1 = sigma_2);
  for GeLU the exact-erf GeLU moments make the gain 1 (the authors give no GeLU rule);
- output head: untied sqrt(1/d) (unit-variance logits from the unit-variance final norm output);
  tied: h E^T has variance d (1-p)/k, so `logit_scale()` = 1/sqrt(d (1-p)/k) (the authors'
  1/sqrt(0.3 d) for k = 3, p = 0.1);
- residual: lambda^2 = 1 - beta^2, beta^2 = `k` / (number of residual merges of the stack, 2 per
  layer in the LM) (2.3; `k` = 2 gives 1/192 ~= the authors' 0.005 at 192 layers);
  `scale_residual=False` gives lambda = beta = 1 (the authors' flag off).
The input correlation r0 (before the embedding dropout) is `r0` (the authors' 0.221 for
BERT/Wikipedia) or, with `r0_from_data`, measured from a token sample (`data_r0`,
`with_token_sample`). Cross-attention (encoder-decoder decoder) uses the same rule with the
encoder output's correlation, the last entry of the encoder's table.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import numpy as np

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn.initializers import Std
from deepscale_jax.schemes.base import Scheme, layer_table
from deepscale_jax.theory import components
from deepscale_jax.theory.measure import Signal


def sigma_vo(r: float, p: float, d: int) -> float:
    """std of v and attn_out for attention input correlation r: d^2 s^4 r/(1-p) = 1 (2.1)."""
    return math.sqrt(math.sqrt((1.0 - p) / r) / d)


@functools.lru_cache(maxsize=64)
def ffn_std(activation: str, d: int, d_ff: int, p: float) -> float:
    """sigma_1 = sigma_2 = sigma with FFN output variance 1 for unit-variance input, solved by
    bisection (in log sigma) on components.ffn_forward, which is increasing in sigma."""

    def gain(log_sigma: float) -> float:
        sigma = math.exp(log_sigma)
        x = Signal(0.0, 1.0, 0.0)
        out = components.ffn_forward(
            x, d=d, d_ff=d_ff, sigma_1=sigma, sigma_2=sigma, activation=activation, p=p
        )
        return out.var

    lo, hi = math.log(1e-6), math.log(10.0)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gain(mid) < 1.0 else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def ffn_output_corr(
    r: float, *, activation: str, d: int, d_ff: int, sigma: float, p: float
) -> float:
    """Inter-token correlation of the FFN block's output for unit-variance input of correlation
    r (components.ffn_forward; for ReLU (1-p)(r + (sqrt(1-r^2) - r arccos r)/pi), theory.md 2.2)."""
    x = Signal(0.0, 1.0, r)
    out = components.ffn_forward(
        x, d=d, d_ff=d_ff, sigma_1=sigma, sigma_2=sigma, activation=activation, p=p
    )
    return out.corr


def attention_output_corr(p: float) -> float:
    """Uniform attention gives every token the same average (correlation 1); the hidden dropout
    keeps the covariance, so 1 - p after it (theory.md 1.9)."""
    return components.dropout_forward(Signal(0.0, 1.0, 1.0), p=p).corr


def correlation_table(
    *,
    num_layers: int,
    sublayers: tuple[str, ...],
    p: float,
    r0: float,
    lam2: float,
    beta2: float,
    ffn_corr,
) -> np.ndarray:
    """r_l, the inter-token correlation at the input of layer l = 0..N (N + 1 values; the last is
    the stack's output), by the recursion of theory.md 2.2 written with components.py's maps.

    The stream starts as the embedding output (unit variance, correlation (1-p) r0). Each
    sublayer ("attn", "cross", "merged", "ffn") merges a unit-variance block output of correlation
    `attention_output_corr(p)` or `ffn_corr(r)` (r = the stream's correlation, which the norm in
    front of the block keeps) into the stream: x <- lambda x + beta f (components.residual_forward).
    """
    lam, beta = math.sqrt(lam2), math.sqrt(beta2)
    x = components.embeddings_forward(sigma_e=math.sqrt(1.0 - p), num_tables=1, p=p, r0=r0)
    table = []
    for _ in range(num_layers):
        table.append(x.corr)
        for kind in sublayers:
            r_block = attention_output_corr(p) if kind != "ffn" else ffn_corr(x.corr)
            x = components.residual_forward(x, f=Signal(0.0, 1.0, r_block), lam=lam, beta=beta)
    table.append(x.corr)
    return np.asarray(table, np.float64)


def same_token_probability(tokens: np.ndarray) -> float:
    """P(two distinct positions of one sequence hold the same token), averaged over sequences.

    Per sequence of length T with token counts c_t: sum_t c_t (c_t - 1) / (T (T - 1)). For i.i.d.
    tokens of frequencies f_t this tends to sum_t f_t^2 (the unigram collision probability);
    within real text it is larger (local repetition), which is what the inter-token correlation
    of a sequence sees. `tokens` is (T,) or (B, T).
    """
    rows = np.atleast_2d(np.asarray(tokens))
    length = rows.shape[1]
    if length < 2:
        raise ValueError(f"a token sample needs sequences of length >= 2, got {length}")
    probs = []
    for row in rows:
        _, counts = np.unique(row, return_counts=True)
        probs.append(float(np.sum(counts * (counts - 1))) / (length * (length - 1)))
    return float(np.mean(probs))


def data_r0(tokens: np.ndarray, model: ModelConfig) -> float:
    """r0 of the DeepScaleLM embedding sum measured from a token sample (B, T).

    Distinct rows of an embedding table are independent, so two tokens' embeddings covary only
    through shared rows: r0 = sum_t pi_t var_t / sum_t var_t (components.shared_row_correlation)
    with pi = `same_token_probability` for the token table and 0 for learned positions (two
    distinct positions never share a row); DeepScaleLM gives both tables the same variance.
    """
    share = [same_token_probability(tokens)]
    if model.position_embedding == "learned":
        share.append(0.0)
    return components.shared_row_correlation(share, [1.0] * len(share))


@functools.lru_cache(maxsize=64)
def _vo_table(scheme: DeepScaleLMScheme) -> np.ndarray:
    """sigma_vo per layer of the scheme's stack (cached per scheme value)."""
    m = scheme.model
    table = scheme.correlation_table()[:-1]
    return np.asarray([sigma_vo(r, m.dropout, m.d_model) for r in table], np.float64)


@dataclasses.dataclass(frozen=True)
class DeepScaleLMScheme(Scheme):
    name = "dslm"
    k: float = 2.0
    r0: float = 0.221
    r0_from_data: bool = False
    scale_residual: bool = True

    def validate(self) -> None:
        super().validate()
        merges = self.model.residual_merges(self.stack)
        if not 0.0 < self.k <= merges:
            raise ValueError(
                f"scheme.k={self.k!r} must lie in (0, {merges}] (beta^2 = k / {merges} residual "
                "merges must not exceed 1)"
            )
        if not 0.0 < self.r0 <= 1.0:
            raise ValueError(f"scheme.r0={self.r0!r} must lie in (0, 1]")
        if self.model.fix_norm:
            raise ValueError(
                "scheme 'dslm' scales the embeddings to variance (1-p)/tables and the tied logits "
                "to unit variance; model.fix_norm=True fixes the rows to norm sqrt(d) instead. "
                "Use one of them"
            )

    # ------------------------------------------------------------------------- derived values

    @property
    def num_tables(self) -> int:
        """Embedding tables summed at the input: token (+ learned positions)."""
        return 2 if self.model.position_embedding == "learned" else 1

    @property
    def beta2(self) -> float:
        return self.k / self.model.residual_merges(self.stack) if self.scale_residual else 1.0

    @property
    def lam2(self) -> float:
        return 1.0 - self.beta2 if self.scale_residual else 1.0

    @property
    def sublayers(self) -> tuple[str, ...]:
        return self.model.sublayers(self.stack)

    @property
    def ffn_std(self) -> float:
        m = self.model
        return ffn_std(m.activation, m.d_model, m.d_ff, m.dropout)

    def correlation_table(self) -> np.ndarray:
        """r_l at the input of each layer of this stack, and at its output (`correlation_table`)."""
        if self.r0_from_data:
            raise ValueError(
                "scheme.r0_from_data=True needs the training data's token statistics: build the "
                "scheme with scheme.with_token_sample(tokens) before initialising the model"
            )
        m = self.model
        corr = functools.partial(
            ffn_output_corr,
            activation=m.activation,
            d=m.d_model,
            d_ff=m.d_ff,
            sigma=self.ffn_std,
            p=m.dropout,
        )
        return correlation_table(
            num_layers=self.depth,
            sublayers=self.sublayers,
            p=m.dropout,
            r0=self.r0,
            lam2=self.lam2,
            beta2=self.beta2,
            ffn_corr=corr,
        )

    def vo_table(self) -> np.ndarray:
        """sigma_vo[l] for every layer l of this stack."""
        return _vo_table(self)

    def cross_vo_std(self) -> float:
        """Cross-attention v/out std: `sigma_vo` of the encoder output's correlation."""
        encoder = self.for_stack("encoder")
        return sigma_vo(
            float(encoder.correlation_table()[-1]), self.model.dropout, self.model.d_model
        )

    # ------------------------------------------------------------------------------ interface

    def std(self, role: str, layer: jax.Array | int | None) -> Std:
        self.check_role(role)
        d, p = self.model.d_model, self.model.dropout
        if role in ("embed", "pos_embed"):
            return math.sqrt((1.0 - p) / self.num_tables)
        if role in ("q", "k", "cross_q", "cross_k", "head"):
            return math.sqrt(1.0 / d)
        if role in ("ffn_in", "ffn_out"):
            return self.ffn_std
        if role in ("v", "attn_out"):
            return layer_table(self.vo_table(), layer)
        if role in ("cross_v", "cross_out"):
            return self.cross_vo_std()
        raise ValueError(f"scheme 'dslm': role {role!r} has no std rule (patch_embed: patch_std)")

    def patch_std(self, fan_in: int) -> float:
        """Patch embedding of unit-variance pixels: output variance (1-p)/k like a table."""
        return math.sqrt((1.0 - self.model.dropout) / self.num_tables / fan_in)

    def residual(self, layer: jax.Array | int) -> tuple[float, float]:
        del layer
        return math.sqrt(self.lam2), math.sqrt(self.beta2)

    def logit_scale(self) -> float:
        if not self.model.tie_embeddings:
            return 1.0
        embed_var = (1.0 - self.model.dropout) / self.num_tables
        return 1.0 / math.sqrt(self.model.d_model * embed_var)

    @property
    def needs_token_sample(self) -> bool:
        return self.r0_from_data

    def with_token_sample(self, tokens: np.ndarray) -> DeepScaleLMScheme:
        """With `r0_from_data`: the scheme with r0 = `data_r0(tokens)`; otherwise itself."""
        if not self.r0_from_data:
            return self
        return dataclasses.replace(self, r0=data_r0(tokens, self.model), r0_from_data=False)
