"""Position-wise feed-forward network: act(x W1 + b1) W2 + b2 (Vaswani et al. 2017, eq. 2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from deepscale_jax.nn.initializers import LayerInit
from deepscale_jax.nn.linear import Dense

ACTIVATION_FNS = {
    "relu": jax.nn.relu,
    # Exact erf GeLU: the form whose moments theory/components.py gives (Kedia et al. 2024, 1.4).
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class MLP(nn.Module):
    d_ff: int
    activation: str = "relu"
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, init: LayerInit) -> jax.Array:
        d_model = x.shape[-1]
        h = Dense(
            (self.d_ff,),
            init.for_role("ffn_in"),
            ("embed", "mlp"),
            use_bias=self.use_bias,
            dtype=self.dtype,
            name="ffn_in",
        )(x)
        h = checkpoint_name(ACTIVATION_FNS[self.activation](h), "ffn_hidden")
        return Dense(
            (d_model,),
            init.for_role("ffn_out"),
            ("mlp", "embed"),
            use_bias=self.use_bias,
            dtype=self.dtype,
            name="ffn_out",
        )(h)
