"""One residual sublayer's moment maps, composed from the component maps.

`Sublayer` holds the maps of one attention or FFN sublayer of nn/block.py (branch, norm,
dropout, residual coefficients lambda, beta, Pre-LN or Post-LN), acting on the mean-field
moments, on (L, L) token covariances within a sequence and between the tokens of two
sequences, and giving the branch's weight-gradient norms; `decoder_sublayers` builds them for
one decoder layer through the scheme hooks. theory/model.py composes them along the stack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from deepscale_jax.model_config import ModelConfig
from deepscale_jax.nn.norms import partial_features
from deepscale_jax.theory import attention, attention_positions, components
from deepscale_jax.theory.measure import Grad, Signal
from deepscale_jax.theory.token_correlation import (
    entrywise,
    off_diagonal_mean,
    pairwise_covariance,
)
from deepscale_jax.theory.typical import typical_norm_gain
from deepscale_jax.theory.weight_gradients import (
    attention_weight_grad_sq,
    cross_tokenwise,
    cross_tokenwise_gain,
    ffn_weight_grad_sq,
    tokenwise,
    with_cov,
)

Forward = Callable[[Signal], Signal]
Backward = Callable[[Signal, Grad], Grad]
CovarianceBackward = Callable[[Signal, np.ndarray], np.ndarray]
CovarianceMap = Callable[..., np.ndarray]
TypicalGain = Callable[[Signal, float], float]

NORM_MAPS: dict[str, tuple[Callable, Callable]] = {
    "layer_norm": (components.layernorm_forward, components.layernorm_backward),
    "rms_norm": (components.rmsnorm_forward, components.rmsnorm_backward),
    "prms_norm": (components.prmsnorm_forward, components.prmsnorm_backward),
    # ScaleNorm at its init gain sqrt(d); it has no eps inside the root (a clamp on |x| only).
    "scale_norm": (
        lambda x, d, eps: components.scalenorm_forward(x, d=d),
        lambda x, g, d, eps: components.scalenorm_backward(x, g, d=d),
    ),
    "none": (lambda x, **_: x, lambda x, g, **_: g),
}


def _norm_maps(cfg: ModelConfig, scale: float) -> tuple[Forward, Backward, TypicalGain]:
    """The norm's moment maps followed by the fixed multiplier `scale` (`scheme.norm_scale`):
    variance and gradient variance both times scale^2; and its `typical_norm_gain`."""
    if cfg.norm not in NORM_MAPS:
        raise ValueError(
            f"no moment maps for model.norm={cfg.norm!r}; have: {', '.join(NORM_MAPS)}"
        )
    norm_f, norm_b = NORM_MAPS[cfg.norm]
    kw = dict(d=cfg.d_model, eps=cfg.norm_eps)
    if cfg.norm == "prms_norm":  # the statistic's feature count
        kw["k"] = partial_features(cfg.d_model, cfg.norm_partial_fraction)

    def forward(x: Signal) -> Signal:
        y = norm_f(x, **kw)
        return Signal(y.mean * scale, y.var * scale**2, y.corr)

    def backward(x: Signal, g: Grad) -> Grad:
        out = norm_b(x, Grad(g.var * scale**2, g.corr), **kw)
        return out

    return forward, backward, lambda x, specific: typical_norm_gain(cfg, scale, x, specific)


@dataclasses.dataclass(frozen=True)
class Sublayer:
    """One residual sublayer's moment maps: branch f, norm, dropout p, coefficients, placement."""

    branch_forward: Forward
    branch_backward: Backward
    norm_forward: Forward
    norm_backward: Backward
    p: float
    lam: float
    beta: float
    placement: str
    branch_backward_covariance: CovarianceMap | None = None  # (x, cov, corr) -> cov
    branch_forward_covariance: CovarianceMap | None = None  # (x, corr) -> cov, token_correlation
    branch_weight_grads: Callable[..., float] | None = None
    branch_cross_forward: Callable[[Signal], float] | None = None
    branch_cross_backward: CovarianceBackward | None = None
    branch_cross_covariance: CovarianceMap | None = None  # (x, cross, corr) -> cross
    normalizes: bool = True  # the norm divides by its input's std (not the identity)
    norm_typical_gain: TypicalGain | None = None  # `typical_norm_gain`, from `_norm_maps`
    input_on_sphere: bool = False  # the input is a norm output (fixed |x|): Post-LN after layer 0
    branch_width: int = 0  # units between the branch's two random matrices; 0: one matrix

    def norm_input_kappa(self, x: Signal, b: Signal) -> float:
        """Fluctuation of the squared norm of a Post-LN merge lam x + beta Drop(b), in units of
        a Gaussian vector's (relative variance 2/d): 0 for a fixed-norm vector, 1 for a Gaussian.
        With a = lam^2 s_x^2, c = beta^2 s_b^2/(1-p) and x, b independent:
            kappa = (a^2 kappa_x + c^2 + 2 a c) / (a + c)^2,
        kappa_x = 0 when x is itself a norm output. The norm's forward map in components.py is
        exact for Gaussian input (kappa = 1); its finite-d correlation loss, r(1-r^2)/(2(d-1)),
        comes from the fluctuation of the norm (delta method), so `_norm_maps` scales it by
        kappa. Without this a Post-LN stack loses that correlation at every sublayer, which
        the real stack does not (measured: 96 DeepNorm layers keep r ~ 0.02 where the Gaussian
        map decays it to 0.01). The backward keeps its Gaussian gain: in a Post-LN stack the
        gradient reaching a norm is already orthogonal to its output (each block is
        homogeneous of degree 1 in its input), so the projection costs nothing and offsets the
        smaller E[1/sigma^2] of a fixed-norm input (tried: the kappa-scaled backward makes the
        prediction decay ~e^-3 over 96 layers where the measurement is flat)."""
        a = self.lam**2 * x.var
        c = self.beta**2 * b.var / (1.0 - self.p)
        kappa_x = 0.0 if self.input_on_sphere else 1.0
        return (a * a * kappa_x + c * c + 2 * a * c) / (a + c) ** 2 if a + c > 0 else 1.0

    def _norm_maps(self, cache: tuple) -> tuple[Forward, Backward]:
        """The norm's moment maps for this sublayer's norm input (`norm_input_kappa`)."""
        if self.placement == "pre" or not self.normalizes:
            return self.norm_forward, self.norm_backward
        x, _, b = cache
        kappa = self.norm_input_kappa(x, b)

        def forward(m: Signal) -> Signal:
            gaussian = self.norm_forward(m)
            return Signal(gaussian.mean, gaussian.var, m.corr - kappa * (m.corr - gaussian.corr))

        return forward, self.norm_backward

    def forward(self, x: Signal) -> tuple[Signal, tuple]:
        """Output moments and what the backward map needs (the inputs of each piece)."""
        if self.placement == "pre":
            h = self.norm_forward(x)
            b = self.branch_forward(h)
            out = components.residual_forward(
                x, f=components.dropout_forward(b, p=self.p), lam=self.lam, beta=self.beta
            )
            return out, (x, h, b)
        b = self.branch_forward(x)
        merged = components.residual_forward(
            x, f=components.dropout_forward(b, p=self.p), lam=self.lam, beta=self.beta
        )
        cache = (x, merged, b)
        return self._norm_maps(cache)[0](merged), cache

    def backward(self, cache: tuple, g: Grad) -> Grad:
        """Gradient moments at the sublayer input from those at its output."""
        if self.placement == "pre":
            x, h, b = cache
            g_b = components.dropout_backward(b, g, p=self.p)
            g_branch = self.norm_backward(x, self.branch_backward(h, g_b))
            return components.residual_backward(
                x, g, g_block=g_branch, lam=self.lam, beta=self.beta
            )
        x, merged, b = cache
        g_merged = self._norm_maps(cache)[1](merged, g)
        g_b = components.dropout_backward(b, g_merged, p=self.p)
        g_branch = self.branch_backward(x, g_b)
        return components.residual_backward(
            x, g_merged, g_block=g_branch, lam=self.lam, beta=self.beta
        )

    def _branch_covariance(
        self, x: Signal, cov: np.ndarray, corr: np.ndarray | None = None
    ) -> np.ndarray:
        if self.branch_backward_covariance is not None:
            return self.branch_backward_covariance(x, cov, corr)
        return tokenwise(lambda g: self.branch_backward(x, g), cov)

    def specific_fluctuation(self, cache: tuple, input_cross: float) -> float:
        """The token-specific fraction of the fluctuation of a Post-LN norm's statistic,
        kappa (1 - rho^2): kappa (`norm_input_kappa`) is the merge's fluctuation in units of a
        Gaussian vector's, and rho the correlation between tokens of different sequences at the
        norm input (`forward_cross`'s merge), whose square is the fraction of a Gaussian
        vector's squared-norm fluctuation shared with every other token: with x_t = c + e_t,
        |x_t|^2 - E = (|c|^2 - E) + 2 c.e_t + (|e_t|^2 - E), of variances 2 rho^2 s^4/d and
        (4 rho (1 - rho) + 2 (1 - rho)^2) s^4/d, which sum to 2 s^4/d."""
        x, merged, b = cache
        branch_cross = self.branch_cross_forward or (lambda s: self.branch_forward(s).cov)
        common = self.lam**2 * input_cross + self.beta**2 * branch_cross(with_cov(x, input_cross))
        rho = float(np.clip(common / merged.var, 0.0, 1.0)) if merged.var > 0 else 0.0
        return self.norm_input_kappa(x, b) * (1.0 - rho**2)

    def _post_norm_gain(self, cache: tuple, x: Signal, input_cross: float) -> float:
        return self.norm_typical_gain(x, self.specific_fluctuation(cache, input_cross))

    def _norm_covariance(
        self,
        cache: tuple,
        x: Signal,
        cov: np.ndarray,
        norm_input_var: np.ndarray,
        input_cross: float,
        tokenwise_map: Callable[[Callable[[Grad], Grad], np.ndarray], np.ndarray],
    ) -> np.ndarray:
        """The norm's backward on a gradient covariance `cov` (within a sequence with
        `tokenwise_map` = `tokenwise`, between sequences with `cross_tokenwise`): Post-LN
        norms cross at their one-model gain, and every norm divides token i's gradient by its
        own input std (`norm_input_var`)."""
        if self.placement == "post":
            out = self._post_norm_gain(cache, x, input_cross) * cov
        else:
            norm_backward = self._norm_maps(cache)[1]
            out = tokenwise_map(lambda g: norm_backward(x, g), cov)
        if not self.normalizes:
            return out
        scale = np.sqrt(x.var / np.asarray(norm_input_var))
        return out * np.outer(scale, scale)

    def backward_covariance(
        self,
        cache: tuple,
        cov: np.ndarray,
        norm_input_var: np.ndarray,
        corr: np.ndarray | None = None,
        input_cross: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`backward` for the (L, L) token covariance of the gradient (per feature): token-wise
        pieces scale its diagonal and off-diagonal by their mean-field variance and covariance
        gains, the attention branch mixes tokens
        (attention_positions.mha_backward_covariance), and the norm divides token i's gradient
        by its own input std (`norm_input_var`, per token).
        `corr`: the (L, L) token correlation at the branch input (token_correlation.py).
        Returns the covariance at the sublayer input, the covariance at the branch output and
        the branch's share c = beta^2 tr(branch path) / lam^2 tr(residual path) of the
        gradient energy at the merge (`typical.merge_relative_variance`).

        Post-LN norms apply the one-model gain `typical_norm_gain` to the whole covariance,
        given the cross-sequence covariance `input_cross` at the sublayer input (what makes
        the norm's statistic a draw common to all tokens; `specific_fluctuation`). A Post-LN
        stream collapses onto one direction shared by all tokens of all sequences, and the
        mean-field E[1/sigma^2] per token, (d - 2)/(d - 3) above it for LayerNorm, would
        compound to e^{2N/(d-3)} over N layers, 2.2x at 48 layers and d = 128
        (experiments/README.md)."""

        def norm(x: Signal, c: np.ndarray) -> np.ndarray:
            return self._norm_covariance(cache, x, c, norm_input_var, input_cross, tokenwise)

        def dropout(b: Signal, c: np.ndarray) -> np.ndarray:
            return tokenwise(lambda g: components.dropout_backward(b, g, p=self.p), c)

        def merge(residual: np.ndarray, branch: np.ndarray) -> np.ndarray:
            return self.lam**2 * residual + self.beta**2 * branch

        def share(residual: np.ndarray, branch: np.ndarray) -> float:
            through = self.lam**2 * np.trace(residual)
            return float(self.beta**2 * np.trace(branch) / through) if through > 0 else 0.0

        if self.placement == "pre":
            x, h, b = cache
            g_b = dropout(b, cov)
            g_branch = norm(x, self._branch_covariance(h, g_b, corr))
            return merge(cov, g_branch), self.beta**2 * g_b, share(cov, g_branch)
        x, merged, b = cache
        g_merged = norm(merged, cov)
        g_b = dropout(b, g_merged)
        g_branch = self._branch_covariance(x, g_b, corr)
        return merge(g_merged, g_branch), self.beta**2 * g_b, share(g_merged, g_branch)

    def forward_cross(
        self,
        cache: tuple,
        cross: np.ndarray,
        corr: np.ndarray,
        token_var: np.ndarray,
        norm_input_var: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(L, L) covariance between the tokens of two *different* sequences after the
        sublayer, from that before it (`cross`), and at the branch input (for the weight
        gradients). `corr` is the token correlation within a sequence at the branch input,
        `token_var` the per-token variance before the sublayer and `norm_input_var` at its norm
        (`token_correlation.forward_covariance`). Token-wise maps act on every pair at its
        correlation (`pairwise_covariance`); attention passes it through each sequence's mean
        attention (attention_positions.mha_cross_covariance). At init every sequence goes
        through the same weights, so the stream's shared direction correlates sequences, and
        the position embedding correlates tokens at the same position of two sequences (about
        half the embedding's variance): a scalar cross covariance would pass both whole
        through attention, which passes only the first (48 xavier Pre-LN layers, d = 256,
        seed 0: the stream's mean cross covariance at the top, 48 measured, 58 predicted by
        the matrix, 69 by the scalar)."""
        x, h_or_merged, _ = cache

        def branch(signal: Signal, cov: np.ndarray, var: np.ndarray) -> np.ndarray:
            if self.branch_cross_covariance is not None:
                return self.branch_cross_covariance(signal, cov, corr)
            return pairwise_covariance(self.branch_forward, signal, cov, var)

        if self.placement == "pre":
            h = h_or_merged
            h_cross = pairwise_covariance(self.norm_forward, x, cross, token_var)
            h_var = np.full_like(token_var, h.var)
            return self.lam**2 * cross + self.beta**2 * branch(h, h_cross, h_var), h_cross
        merged = self.lam**2 * cross + self.beta**2 * branch(x, cross, token_var)
        norm = self._norm_maps(cache)[0]
        return pairwise_covariance(norm, h_or_merged, merged, norm_input_var), cross

    def backward_cross(
        self,
        cache: tuple,
        cross: np.ndarray,
        norm_input_var: np.ndarray,
        input_cross: np.ndarray | float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`backward_covariance` for the cross-sequence gradient covariance (L, L): token-wise
        maps scale every entry by their covariance gain for the pair of tokens it couples,
        whose inputs correlate as tokens of different sequences do (`input_cross`, the (L, L)
        covariance between sequences at the branch input, or one value for all pairs): for
        ReLU the fraction of units active in both,
        (pi - arccos rho) / (2 pi), is smaller between sequences than within a collapsed
        one, so gradients of different sequences decorrelate going down (Balduzzi et al.
        2017, shattered gradients). Attention mixes through the mean attention
        (attention_positions.mha_backward_cross). A Post-LN norm applies the same one-model
        gain as in `backward_covariance`."""

        pairs = np.asarray(input_cross, float)
        shared = off_diagonal_mean(pairs) if pairs.ndim == 2 else float(pairs)

        def norm(x: Signal, c: np.ndarray) -> np.ndarray:
            return self._norm_covariance(cache, x, c, norm_input_var, shared, cross_tokenwise)

        def branch(x: Signal, c: np.ndarray) -> np.ndarray:
            if self.branch_cross_backward is not None:
                return self.branch_cross_backward(x, c)
            gain = lambda r: cross_tokenwise_gain(self.branch_backward, Signal(x.mean, x.var, r))
            corr = np.broadcast_to(pairs, c.shape) / x.var if x.var > 0 else np.zeros(c.shape)
            return entrywise(gain, corr) * c

        if self.placement == "pre":
            x, h, _ = cache
            g_branch = norm(x, branch(h, cross))
            return self.lam**2 * cross + self.beta**2 * g_branch, self.beta**2 * cross
        x, merged, _ = cache
        g_merged = norm(merged, cross)
        g_branch = branch(x, g_merged)
        return self.lam**2 * g_merged + self.beta**2 * g_branch, self.beta**2 * g_merged

    def weight_grad_sq(
        self,
        cache: tuple,
        branch_grad: np.ndarray,
        batch: int,
        input_cross: np.ndarray,
        branch_grad_cross: np.ndarray,
    ) -> float:
        """E sum |dL/dW|^2 over `batch` sequences and the branch's weight matrices
        (weight_gradients.py), from the gradient covariances at the branch output within and
        across sequences (`backward_covariance`'s and `backward_cross`'s second) and the branch
        input's cross-sequence covariance (`forward_cross`'s second)."""
        if self.branch_weight_grads is None:
            return 0.0
        x, h_or_merged, _ = cache
        branch_input = h_or_merged if self.placement == "pre" else x
        return self.branch_weight_grads(
            branch_input, branch_grad, batch, input_cross, branch_grad_cross
        )


def decoder_sublayers(cfg: ModelConfig, scheme: Any, layer: int, seq_len: int) -> list[Sublayer]:
    """The attention and FFN sublayers of decoder layer `layer`, as nn/block.py builds them,
    through the same scheme hooks: stds from `scheme.std(role, layer)`, (lambda, beta) from
    `scheme.residual(layer)` (beta times the zero-initialised gate if `learned_residual`), the
    norm's output times `scheme.norm_scale(layer)`."""
    std = lambda role: float(scheme.std(role, layer))
    lam, beta = (float(c) for c in scheme.residual(layer))
    if getattr(scheme, "learned_residual", False):
        beta = 0.0  # ReZero: the gate starts at 0
    norm_scale = float(getattr(scheme, "norm_scale", lambda _: 1.0)(layer))
    attn_kw = dict(
        d=cfg.d_model,
        heads=cfg.num_heads,
        L=seq_len,
        sigma_q=std("q"),
        sigma_k=std("k"),
        sigma_v=std("v"),
        sigma_o=std("attn_out"),
        p_attn=cfg.attn_dropout,
        causal=cfg.architecture != "encoder_only",
    )
    ffn_kw = dict(
        d=cfg.d_model,
        d_ff=cfg.d_ff,
        sigma_1=std("ffn_in"),
        sigma_2=std("ffn_out"),
        activation=cfg.activation,
        p=0.0,
    )
    norm_forward, norm_backward, norm_typical_gain = _norm_maps(cfg, norm_scale)
    common = dict(
        norm_typical_gain=norm_typical_gain,
        norm_forward=norm_forward,
        norm_backward=norm_backward,
        p=cfg.dropout,
        lam=lam,
        beta=beta,
        placement=cfg.norm_placement,
        normalizes=cfg.norm != "none",
    )
    on_sphere = cfg.norm_placement == "post" and cfg.norm != "none"
    return [
        Sublayer(
            lambda x: attention.mha_forward(x, **attn_kw),
            lambda x, g: attention.mha_backward(x, g, **attn_kw),
            **common,
            input_on_sphere=on_sphere and layer > 0,
            branch_width=cfg.d_model,  # sum over heads of W_v^h W_o^h: H d_head = d units
            branch_backward_covariance=lambda x, c, corr: (
                attention_positions.mha_backward_covariance(x, c, corr=corr, **attn_kw)
            ),
            branch_forward_covariance=lambda x, corr: attention_positions.mha_forward_covariance(
                x, corr, **attn_kw
            ),
            branch_weight_grads=lambda *a: attention_weight_grad_sq(*a, **attn_kw),
            branch_cross_forward=lambda x: attention.mha_cross_forward(x, **attn_kw),
            branch_cross_backward=lambda x, c: attention_positions.mha_backward_cross(
                x, c, **attn_kw
            ),
            branch_cross_covariance=lambda x, cross, corr: attention_positions.mha_cross_covariance(
                x, cross, corr, **attn_kw
            ),
        ),
        Sublayer(
            lambda x: components.ffn_forward(x, **ffn_kw),
            lambda x, g: components.ffn_backward(x, g, **ffn_kw),
            **common,
            input_on_sphere=on_sphere,
            branch_width=cfg.d_ff // 2,  # the active half of the units (ReLU; GeLU about)
            branch_weight_grads=lambda *a: ffn_weight_grad_sq(*a, **ffn_kw),
        ),
    ]
