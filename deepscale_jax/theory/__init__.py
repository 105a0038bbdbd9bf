"""Signal-propagation theory (Kedia et al. 2024): closed-form moment maps and their measurement.

- measure.py: moment types, the equicorrelated sampler, estimators, the authors' error metric,
  and Monte Carlo measurement of any function built from the real nn/ modules.
- components.py: forward/backward moment maps of the elementwise and linear components.
- attention.py: moment maps of softmax attention, including the query/key gradient paths.
- model.py: the maps composed along the block structure of a whole model.
"""
