"""The reference implementations' weight initialisations, as Flax initializers.

- ``he_normal_fan_out``: normal(0, sqrt(2 / (k * k * out))) for every conv. bethgelab's BagNet
  (``bagnets/pytorchnet.py``: ``n = k * k * out_channels; weight.normal_(0, sqrt(2 / n))``), torchvision's
  ResNet and MobileNetV3 (``kaiming_normal_(mode='fan_out')``). A Flax kernel is (k, k, in, out) or, for a
  depthwise conv, (k, k, 1, C), so its fan_out is k*k*out as PyTorch counts it for (out, in/groups, k, k).
- ``torch_default_kernel`` and ``torch_default_bias(fan_in)``: PyTorch's own ``nn.Linear``/``nn.Conv2d``
  initialisation, which the BagNet and ResNet-50 fc layers keep: ``kaiming_uniform_(a=sqrt(5))`` gives
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the weight, and the bias is drawn from the same bound.
- BatchNorm: scale 1, bias 0, as all three references set it (Flax's defaults).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

he_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# kaiming_uniform_(a=sqrt(5)): gain^2 = 2 / (1 + 5) = 1/3, bound = sqrt(3 * gain^2 / fan_in) = 1/sqrt(fan_in).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias of a layer with ``fan_in`` inputs: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return uniform_symmetric(1.0 / math.sqrt(fan_in))


def uniform_symmetric(bound: float) -> nn.initializers.Initializer:
    """U(-bound, bound)."""

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init
