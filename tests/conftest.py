"""Test set-up: 8 fake CPU devices and fast XLA compiles, set before jax is imported anywhere."""

import os

from tests.cli import FAST_COMPILE_FLAGS  # imports no jax

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" {FAST_COMPILE_FLAGS} --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One TFDS data dir per test session with the Shakespeare corpus prepared (~1 s)."""
    from deepscale_jax.data import shakespeare

    path = str(tmp_path_factory.getbasetemp() / "tfds_data")
    shakespeare.prepare_shakespeare(path)
    return path
