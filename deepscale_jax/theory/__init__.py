"""Signal-propagation theory (Kedia et al. 2024): closed-form moment maps and their measurement.

- measure.py: moment types, the equicorrelated sampler, estimators, the authors' error metric,
  and Monte Carlo measurement of any function built from the real nn/ modules.
- components.py: forward/backward moment maps of the elementwise and linear components.
- attention.py: moment maps of softmax attention, including the query/key gradient paths.
- attention_positions.py: the same on (L, L) token covariances (position-resolved).
- softmax_functionals.py: the softmax quadratures attention.py reads its moments from.
- token_correlation.py: (L, L) token covariances within and between sequences, forward.
- weight_gradients.py: expected weight-gradient norms from token covariances.
- typical.py: one model's typical gains (Post-LN norms, residual merges) against mean-field.
- sublayer.py: one residual sublayer's maps (branch, norm, dropout, residual; Pre/Post-LN).
- model.py: the sublayer maps composed along the block structure of a whole model.
- model_measure.py: the same per-layer moments measured on the real LM, side by side.
"""
