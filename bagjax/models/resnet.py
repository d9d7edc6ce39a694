"""ResNet-50 (torchvision-exact) and the bottleneck block it shares with BagNet.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), in torchvision's v1.5 form (the
stride sits on the 3x3 conv). It is the baseline of the blackout paper (Zou, Yan, Liu, section 4.1) and the
downstream classifier for AnchorNet (Yang et al., section 4.3). Parameter names mirror torchvision's
state_dict (``layer1.0.conv1`` -> ``layer1_0/conv1``) so that ``bagjax.convert`` is a renaming.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bagjax.models.contract import Capabilities
from bagjax.models.heads import Head, check_head
from bagjax.models.initializers import he_normal_fan_out, torch_default_bias, torch_default_kernel

ModuleDef = Any

# PyTorch BatchNorm2d(momentum=m) keeps (1 - m) of the old running statistics, which is Flax's momentum.
TORCH_BN_MOMENTUM = 0.1
BN_EPSILON = 1e-5


def torch_momentum(bn_momentum: float | None, official: float = TORCH_BN_MOMENTUM) -> float:
    """The PyTorch momentum of a BatchNorm: ``official`` unless a model's ``bn_momentum`` (Flax convention) is set."""
    return official if bn_momentum is None else 1.0 - bn_momentum


def conv(dtype: jnp.dtype) -> ModuleDef:
    """A bias-free, unpadded, He-normal (fan_out) conv as in both torch references; padding is passed per call."""
    return functools.partial(nn.Conv, use_bias=False, padding="VALID", kernel_init=he_normal_fan_out, dtype=dtype,
                             param_dtype=jnp.float32)


def norm(dtype: jnp.dtype, train: bool, torch_momentum: float = TORCH_BN_MOMENTUM) -> ModuleDef:
    """BatchNorm with PyTorch's epsilon and its momentum translated to Flax's convention (1 - m)."""
    return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=1.0 - torch_momentum,
                             epsilon=BN_EPSILON, dtype=dtype, param_dtype=jnp.float32)


def crop_to(residual: jnp.ndarray, like: jnp.ndarray) -> jnp.ndarray:
    """Crop the residual at the bottom/right to the main path's size (bethgelab BagNet, Bottleneck.forward).

    A plain ``lax.slice`` (not NumPy indexing, which may become a gather): exporters keep it a Slice for
    symbolic image sizes (``bagjax.export``).
    """
    return jax.lax.slice(residual, (0, 0, 0, 0), (residual.shape[0], like.shape[1], like.shape[2], residual.shape[3]))


class Bottleneck(nn.Module):
    """ResNet bottleneck 1x1 -> kxk (strided) -> 1x1 (x4) with a projection or identity skip.

    ``padding=0`` and ``kernel`` 1 or 3 give BagNet's block, whose smaller main path is met by cropping the
    skip at the bottom/right. ``out_features`` widens the last conv to n_k channels with a bias and no BN,
    and zero-pads the skip on both sides, the thesis's identity-head adaptation (Qian, 4.3.2 and appendix A
    ``rn18_l4_1a_nc_1k``); that conv is created after the network's initialisation there, so it keeps PyTorch's
    default ``nn.Conv2d`` initialisation (``bagjax.models.initializers``).

    Initialisation (``bagjax.models.initializers``): every other conv He-normal with fan_out, BatchNorm
    scale 1 and bias 0, as bethgelab's BagNet and torchvision's ResNet.
    """

    planes: int
    strides: int = 1
    kernel: int = 3
    padding: int = 1
    downsample: bool = False
    out_features: int | None = None
    dtype: jnp.dtype = jnp.float32
    bn_momentum: float = TORCH_BN_MOMENTUM

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        cv, bn = conv(self.dtype), norm(self.dtype, train, self.bn_momentum)
        p = self.padding
        y = nn.relu(bn(name="bn1")(cv(self.planes, (1, 1), name="conv1")(x)))
        y = cv(self.planes, (self.kernel, self.kernel), (self.strides, self.strides), padding=((p, p), (p, p)),
               name="conv2")(y)
        y = nn.relu(bn(name="bn2")(y))
        residual = x
        if self.downsample:
            residual = cv(self.planes * 4, (1, 1), (self.strides, self.strides), name="downsample_conv")(x)
            residual = bn(name="downsample_bn")(residual)
        if self.out_features is None:
            y = bn(name="bn3")(cv(self.planes * 4, (1, 1), name="conv3")(y))
        else:
            y = cv(self.out_features, (1, 1), use_bias=True, kernel_init=torch_default_kernel,
                   bias_init=torch_default_bias(self.planes), name="conv3")(y)
            extra = self.out_features - residual.shape[-1]
            residual = jnp.pad(residual, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return nn.relu(y + crop_to(residual, y))


def max_pool_3x3_s2(x: jnp.ndarray) -> jnp.ndarray:
    """torchvision's stem ``MaxPool2d(3, stride=2, padding=1)``: pad one -inf pixel per side, then a VALID pool.

    The same numbers as ``nn.max_pool(..., padding=((1, 1), (1, 1)))``, written with the padding outside the pool
    so that exporters that only know 'VALID'/'SAME' pools (jax2onnx, ``bagjax.export``) take it too.
    """
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding="VALID")


def stage_plan(stage_sizes: Sequence[int], stage_strides: Sequence[int], kernel3: Sequence[int]):
    """Yield (stage, block, planes_multiplier, stride, kernel) for every bottleneck, in order."""
    for s, (n, stride) in enumerate(zip(stage_sizes, stage_strides)):
        for i in range(n):
            yield s, i, 2**s, stride if i == 0 else 1, 3 if i < kernel3[s] else 1


class ResNet50(nn.Module):
    """torchvision ResNet-50: 7x7/2 conv, 3x3/2 max-pool, bottlenecks [3, 4, 6, 3], GAP, head.

    ``__call__`` returns ``(logits, {})`` (``bagjax.models.contract``). The head acts on the pooled 2048-d
    feature (thesis 3.1, Eq. 3.2-3.3). ``bn_momentum`` (Flax convention) sets every BatchNorm's momentum; None
    keeps torchvision's (0.9 in Flax terms).
    """

    num_classes: int
    head: str = "learned"
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    identity_expand: bool = False
    dtype: jnp.dtype = jnp.float32
    bn_momentum: float | None = None

    @property
    def num_features(self) -> int:
        return self.num_classes if self.identity_expand else self.width * 8 * 4

    @property
    def capabilities(self) -> Capabilities:
        """Padded convs and global pooling: no bounded receptive field, no patch logits; a CAM from its features."""
        return Capabilities(features=True, head=self.head, num_features=self.num_features,
                            cacheable_head=True)  # the head acts on the pooled feature (pooled_features)

    def features(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """The last block's feature map ``(B, H/32, W/32, n_c)``."""
        return self(x, train, output="features")

    def pooled_features(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """``(B, n_c)``: the globally average-pooled feature the head takes."""
        return jnp.mean(self.features(x, train).astype(jnp.float32), axis=(1, 2))

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, output: str = "logits") -> Any:
        check_head(self.head, self.num_classes, self.num_features)
        x = x.astype(self.dtype)
        x = conv(self.dtype)(self.width, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv1")(x)
        x = nn.relu(norm(self.dtype, train, torch_momentum(self.bn_momentum))(name="bn1")(x))
        x = max_pool_3x3_s2(x)
        plan = list(stage_plan(self.stage_sizes, (1, 2, 2, 2), kernel3=self.stage_sizes))  # every middle conv 3x3
        for s, i, mult, stride, kernel in plan:
            last = (s, i) == plan[-1][:2]
            x = Bottleneck(self.width * mult, stride, kernel=kernel, padding=1, downsample=i == 0,
                           out_features=self.num_classes if (last and self.identity_expand) else None,
                           dtype=self.dtype, bn_momentum=torch_momentum(self.bn_momentum),
                           name=f"layer{s + 1}_{i}")(x, train)
        if output == "features":
            return x
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return Head(self.head, self.num_classes, self.dtype, name="head")(pooled), {}
