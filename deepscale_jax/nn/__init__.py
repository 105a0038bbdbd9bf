"""Flax linen building blocks; every weight's initializer comes from a scheme."""
