"""Experiment configs: `get_config(arg)` in each task file, shared pieces in common.py."""
