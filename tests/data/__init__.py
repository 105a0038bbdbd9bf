"""Tests of deepscale_jax.data."""
