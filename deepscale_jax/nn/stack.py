"""N layers, scanned (`nn.scan`, params stacked on a leading "layers" axis) or unrolled.

The 0-based layer index is passed to every layer as an input (a scanned `jnp.arange(N)` under
scan), so layer-dependent inits and residual coefficients are jnp math on it. Each layer also gets
its own init key `fold_in(stack_key, index)` (nn/initializers.py), which makes the scanned and
the unrolled stack produce identical parameters for the same seed.

Each layer exposes its output residual stream for measurement (theory/model_measure.py): sown
into the "intermediates" collection and open to `perturb` ("perturbations"), whose gradient
is dLoss/d(residual stream); both are no-ops unless those collections are requested.

Rematerialisation (`model.remat_policy`) wraps each layer in `nn.remat` with a named policy:
- none: no remat (every activation kept);
- full: nothing saved, the whole layer recomputed in the backward pass;
- dots: matmul outputs saved (`checkpoint_dots`);
- dots_no_batch: matmuls without batch dimensions saved (weights-only dots);
- sublayer_outputs: only the tagged attention/FFN branch outputs saved ("attn_out", "ffn_out").
"""

from __future__ import annotations

import re
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# Module names of the layers, hence parameter-tree keys (read by the converter and spike
# detection): the scanned stack is one module whose leaves carry a leading layer axis;
# unrolled layer i is `unrolled_layer_name(i)`.
SCANNED_LAYERS = "layers"
UNROLLED_LAYER = re.compile(r"layer_(\d+)")


def unrolled_layer_name(index: int) -> str:
    return f"layer_{index:03d}"


REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "sublayer_outputs": jax.checkpoint_policies.save_only_these_names("attn_out", "ffn_out"),
}


def layer_keys(stack_key: jax.Array, num_layers: int) -> jax.Array:
    """(N, ...) per-layer init keys fold_in(stack_key, l)."""
    return jax.vmap(lambda i: jax.random.fold_in(stack_key, i))(jnp.arange(num_layers))


class LayerStack(nn.Module):
    """Applies `num_layers` layers of class `layer_cls`.

    Every layer class is built as `layer_cls(config=..., scheme=..., deterministic=...)` and
    called as `layer(x, index, key, *broadcast_args) -> (x, None)`; `broadcast_args` (masks,
    encoder outputs) are the same for every layer.
    """

    layer_cls: type[nn.Module]
    config: object
    scheme: object
    num_layers: int
    scan: bool = True
    remat_policy: str = "none"
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *broadcast_args) -> jax.Array:
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(
                f"unknown model.remat_policy={self.remat_policy!r}; "
                f"accepted: {', '.join(REMAT_POLICIES)}"
            )
        # The stack key only feeds initializers; at apply time no 'params' rng exists.
        stack_key = self.make_rng("params") if self.is_initializing() else jax.random.PRNGKey(0)
        keys = layer_keys(stack_key, self.num_layers)
        indices = jnp.arange(self.num_layers, dtype=jnp.int32)

        layer_cls = self.layer_cls
        if self.remat_policy != "none":
            layer_cls = nn.remat(
                layer_cls, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=not self.scan
            )
        if self.scan:
            scanned = nn.scan(
                layer_cls,
                variable_axes={"params": 0, "intermediates": 0, "perturbations": 0},
                split_rngs={"params": False, "dropout": True},
                in_axes=(0, 0) + (nn.broadcast,) * len(broadcast_args),
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},  # the logical axis (sharding.py)
            )
            layer = scanned(**self._layer_kwargs(), name=SCANNED_LAYERS)
            x, _ = layer(x, indices, keys, *broadcast_args)
            return x
        for i in range(self.num_layers):
            layer = layer_cls(**self._layer_kwargs(), name=unrolled_layer_name(i))
            x, _ = layer(x, indices[i], keys[i], *broadcast_args)
        return x

    def _layer_kwargs(self) -> dict:
        return {"config": self.config, "scheme": self.scheme, "deterministic": self.deterministic}


def unstack_layers(stack_params: dict, num_layers: int) -> dict:
    """A scanned stack's params {"layers": leaves (N, ...)} -> unrolled {"layer_000": ..., ...}."""
    stacked = stack_params[SCANNED_LAYERS]
    return {
        unrolled_layer_name(i): jax.tree.map(lambda a, i=i: a[i], stacked)
        for i in range(num_layers)
    }


def stack_layers(unrolled_params: dict) -> dict:
    """The inverse of `unstack_layers`: {"layer_000": ..., ...} -> {"layers": leaves (N, ...)}."""
    names = sorted(unrolled_params)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(unrolled_params[n] for n in names))
    return {SCANNED_LAYERS: stacked}


def per_layer_params(stack_params: dict, num_layers: int) -> list[dict]:
    """The params of each layer, in order, from either layout."""
    unrolled = (
        unstack_layers(stack_params, num_layers) if "layers" in stack_params else stack_params
    )
    return [unrolled[f"layer_{i:03d}"] for i in range(num_layers)]
