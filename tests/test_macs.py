"""Multiply-adds counted from a model's conv and FC layers, against a count by hand."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bagjax.models.layers import DepthwiseConv
from bagjax.models.macs import multiply_adds


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), padding="VALID")(x)  # (5, 5, 2) -> (3, 3, 4): 36 outputs x 3*3*2 = 648
        x = nn.Conv(6, (1, 1), strides=2, use_bias=False)(x)  # (3, 3, 4) -> (2, 2, 6): 24 outputs x 4 = 96
        x = DepthwiseConv(2)(x)  # (2, 2, 6) -> (1, 1, 6): 6 outputs x 2*2 = 24
        x = jnp.max(nn.relu(x), axis=(1, 2))  # no multiply-adds
        return nn.Dense(3)(x)  # 3 outputs x 6 = 18


def test_multiply_adds_by_hand():
    model, x = Tiny(), jnp.zeros((2, 5, 5, 2))
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert multiply_adds(model, variables, x) == 2 * (648 + 96 + 24 + 18)
