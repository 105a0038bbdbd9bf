"""Mesh construction and logical-axis rules."""

import jax
import pytest
from jax.sharding import PartitionSpec

from deepscale_jax import sharding
from tests.helpers import tiny_lm, tokens


def test_mesh_auto_fill():
    assert sharding.resolve_mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ({"data": 3, "fsdp": 1, "tensor": 1}, r"needs 3 devices but 8 are available"),
        ({"data": -1, "fsdp": -1}, r"at most one -1"),
        ({"data": -1, "fsdp": 3}, r"do not divide the 8 available devices"),
        ({"pipeline": 2}, r"unknown mesh axis mesh.shape.pipeline"),
    ],
)
def test_bad_mesh_shapes(shape, message):
    with pytest.raises(ValueError, match=message):
        sharding.resolve_mesh_shape(shape, 8)


def test_params_are_sharded_by_logical_rules():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = tiny_lm()
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens())["params"])
    shardings = sharding.param_shardings(abstract, mesh, sharding.DEFAULT_RULES)
    q = shardings["decoder"]["layers"]["attn"]["q"]["kernel"]
    assert q.spec == PartitionSpec(None, "fsdp", "tensor", None)  # layers, embed, heads, kv
    assert shardings["embed"]["embedding"].spec == PartitionSpec("tensor", "fsdp")


def test_batch_must_divide_batch_shards():
    mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
    with pytest.raises(ValueError, match=r"train.batch_size=12 is not divisible by the 8"):
        sharding.check_batch_divisible(12, mesh)
