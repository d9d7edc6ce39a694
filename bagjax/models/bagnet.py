"""BagNet-9/17/33 (Brendel & Bethge, ICLR 2019), exact to bethgelab's ``bagnets/pytorchnet.py``.

A ResNet-50 whose 3x3 convs are limited so every output location sees one rf x rf patch: a 1x1 + 3x3 stem
with no padding, bottlenecks [3, 4, 6, 3] with strides [2, 2, 2, 1] on the middle conv, and a 3x3 middle conv
only in the first ``kernel3[s]`` blocks of stage s (everything else 1x1). Every conv is unpadded, so the grid is
top-left aligned: location (i, j) sees the box ``[8i, 8i + rf) x [8j, 8j + rf)``.

The head is applied per location (``patch_logits``) and the image logits are their plain mean, the
bag-of-features property. The official code instead pools with ``AvgPool2d(x.size(2), stride=1)``, which is
the same mean on a square feature map and raises on a non-square one; bagjax takes the spatial mean of any map.

Initialisation as the official code: convs normal(0, sqrt(2 / (k*k*out))), BatchNorm 1 and 0, the fc layer
PyTorch's ``nn.Linear`` default (``bagjax.models.initializers``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from bagjax.models.clip import clipped_logits, parse_clip
from bagjax.models import contract
from bagjax.models.contract import Capabilities
from bagjax.models.heads import NORMALISING, Head, check_head, pool_for_head
from bagjax.models.resnet import Bottleneck, conv, norm, stage_plan, torch_momentum
from bagjax.errors import UserError

STAGE_STRIDES = (2, 2, 2, 1)
# kernel3 of the official bagnet33/17/9 constructors: how many blocks of each stage get a 3x3 middle conv.
KERNEL3 = {"bagnet9": (1, 1, 0, 0), "bagnet17": (1, 1, 1, 0), "bagnet33": (1, 1, 1, 1)}
# The stem BN of the official model uses PyTorch momentum 0.001 (Flax 0.999); the blocks use the default 0.1.
STEM_BN_MOMENTUM = 0.001


def receptive_field(kernel3: Sequence[int], stage_sizes: Sequence[int] = (3, 4, 6, 3),
                    strides: Sequence[int] = STAGE_STRIDES) -> tuple[int, int]:
    """(rf, stride) in input pixels, walking the conv chain: 3x3 stem, then each block's middle conv.

    The one definition of a BagNet's geometry; ``BagNet.capabilities`` declares it and everything else asks there.
    """
    rf, jump = 3, 1
    for _, _, _, stride, kernel in stage_plan(stage_sizes, strides, kernel3):
        rf += (kernel - 1) * jump
        jump *= stride
    return rf, jump


def grid_size(size: int, kernel3: Sequence[int], stage_sizes: Sequence[int] = (3, 4, 6, 3)) -> int:
    """Number of output locations along one axis of ``size`` input pixels (unpadded conv arithmetic)."""
    return contract.grid_size(size, *receptive_field(kernel3, stage_sizes))


class BagNet(nn.Module):
    """BagNet with a classifier head applied at every location.

    ``__call__`` returns ``(logits, {})`` (``bagjax.models.contract``) with image logits ``(B, C)``;
    ``patch_logits`` returns ``(B, H', W', C)``, whose spatial mean the image logits are (for every head).
    ``width`` and ``stage_sizes`` shrink the network for demos; the defaults are the paper's. ``bn_momentum``
    (Flax convention) sets every BatchNorm's momentum; None keeps the official ones (stem 0.999, blocks 0.9 in
    Flax terms). ``clip`` (a ``bagjax.models.clip.parse_clip`` spec) makes the image logits Clipped BagNet's,
    the mean of the clipped patch logits.
    """

    kernel3: Sequence[int]
    num_classes: int
    head: str = "learned"
    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    width: int = 64
    identity_expand: bool = False
    dtype: jnp.dtype = jnp.float32
    bn_momentum: float | None = None
    clip: str = ""

    @property
    def capabilities(self) -> Capabilities:
        rf, stride = receptive_field(self.kernel3, self.stage_sizes)
        # Head-only training on cached features (bagjax.training.features): the mean patch logit follows from
        # pooled_features(x) through the head alone (a clipped mean does not); the heads that normalise per
        # location take the mean of the normalised features.
        return Capabilities(patch_logits=True, features=True, receptive_field=rf, stride=stride,
                            head=self.head, num_features=self.num_features, cacheable_head=not self.clip,
                            pooled_normalized=self.head in NORMALISING)

    @property
    def num_features(self) -> int:
        return self.num_classes if self.identity_expand else self.width * 8 * 4

    def features(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Per-location features ``(B, H', W', n_c)`` before the head."""
        return self(x, train, output="features")

    def pooled_features(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """``(B, n_c)``: the mean over locations of what the per-location head multiplies (``pool_for_head``)."""
        return pool_for_head(self.head, self.features(x, train))

    def patch_logits(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Per-patch class evidence ``(B, H', W', C)``; the image logits are its mean over H', W'."""
        return self(x, train, output="patch_logits")

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False, output: str = "logits") -> Any:
        check_head(self.head, self.num_classes, self.num_features)
        rf = self.capabilities.receptive_field
        if x.ndim != 4 or x.shape[1] < rf or x.shape[2] < rf:
            raise UserError(f"BagNet-{rf} needs NHWC images of at least {rf}x{rf} px (its receptive field), "
                            f"got shape {tuple(x.shape)}: use a larger image_size")
        cv = conv(self.dtype)
        x = x.astype(self.dtype)
        x = cv(self.width, (1, 1), name="conv1")(x)
        x = cv(self.width, (3, 3), name="conv2")(x)
        x = nn.relu(norm(self.dtype, train, torch_momentum(self.bn_momentum, STEM_BN_MOMENTUM))(name="bn1")(x))
        plan = list(stage_plan(self.stage_sizes, STAGE_STRIDES, self.kernel3))
        for s, i, mult, stride, kernel in plan:
            last = (s, i) == plan[-1][:2]
            x = Bottleneck(self.width * mult, stride, kernel=kernel, padding=0, downsample=i == 0,
                           out_features=self.num_classes if (last and self.identity_expand) else None,
                           dtype=self.dtype, bn_momentum=torch_momentum(self.bn_momentum),
                           name=f"layer{s + 1}_{i}")(x, train)
        if output == "features":
            return x
        patch_logits = Head(self.head, self.num_classes, self.dtype, name="head")(x)
        if output == "patch_logits":
            return patch_logits
        if self.clip:
            return clipped_logits(patch_logits, parse_clip(self.clip)), {}
        return jnp.mean(patch_logits, axis=(1, 2)), {}
