"""AnchorNet (Yang et al., "Localizing Multi-scale Semantic Patches for Image Classification"), as in the paper.

A MobileNetV3-style head (Table 1) feeds three localization branches (Table 2) with receptive fields 63, 95 and
111 px at stride 8 (grids 21, 17 and 15 on a 224 px input). Each branch B^j:

- two bottlenecks -> features Z; a linear 1x1 conv (with bias) -> class maps F^j (H x W x C);
- an attention branch: the table's last bottleneck on Z -> X, then Eq. 1-5 -> spatial attention S (softmax
  over the H*W locations);
- image logits = sum over locations of F * S (see "pooling" below), softmax-supervised by cross-entropy;
- training only: an auxiliary classifier FC(GAP(X)) with its own cross-entropy ("a FC layer and softmax
  function behind the attention features X"; Figure 2 cancels the GAP/FC connection at test). At eval it is
  neither computed nor returned (its parameters are still created by ``init``).

Pooling ("global average pooling for F^j" after the product with S): S is a probability distribution over
locations, so ``sum_hw F * S`` already is the attention-weighted *average* of the patch logits -- the paper's
"linear average aggregation". The literal mean of the product equals that divided by H*W, a fixed temperature
that differs per branch (441, 289, 225 at 224 px) and would make the branch confidences P^j of Eq. 6-8
incomparable. bagjax therefore uses ``pooling='sum'`` by default; ``pooling='mean'`` gives the literal reading.

Every conv is unpadded, so location (i, j) of branch rf sees the input box ``[8i, 8i + rf) x [8j, 8j + rf)``
through the conv path. SE blocks pool globally; see ``bagjax.models.layers`` for holding their gates fixed.

Reading of the tables: Table 2 lists the 3x3/480 bottleneck first in both B63 and B95; each branch gets its own
(unshared) copy. The tables mark which bottlenecks have SE but not its size, and the paper gives 1.6M parameters
and 0.5G "FLOPs" (multiply-adds of convs and FCs, as for MobileNetV3; ``bagjax.models.macs``). ``se_size``
picks one of three readings (``layers.SE_SIZES``); at 224 px and 1000 classes, eval mode:

- ``'output'`` (default, the nearest to 1.6M): SE on the projected output, squeeze out/4: 1.55M parameters;
- ``'input'``: SE on the expanded features, squeeze = input channels/4 as in the authors' later public
  ``Block``: 1.71M;
- ``'expansion'``: SE on the expanded features, squeeze expansion/4 (MobileNetV3): 2.53M, 1.03M of them in SE.

All three cost 0.485G multiply-adds (XLA: 1.01G FLOPs); the readings differ only in parameters that cost
almost no FLOPs. Each count includes the training-only auxiliary FCs (0.29M); ``python -m bagjax.models.macs``
prints the table.

Not to be confused with the later single-branch localizer in the authors' public code (swish activations,
95 px patches, no attention branches): that is a different model and is not implemented here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bagjax.models.layers import BN_MOMENTUM, SE_SIZES, Bneck, ConvBN
from bagjax.errors import UserError

RECEPTIVE_FIELDS = (63, 95, 111)
STRIDE = 8
MIN_INPUT = max(RECEPTIVE_FIELDS)
POOLINGS = ("sum", "mean")
SE_SIZE = "output"  # the default reading of the SE blocks (see the module docstring and layers.SE_SIZES)


class BneckSpec(NamedTuple):
    """One row of AnchorNet Table 1/2: kernel, expansion (Exp), output (Out), SE, NL, stride (s)."""

    kernel: int
    expansion: int
    out: int
    se: bool
    nl: str
    stride: int


# AnchorNet Table 1 (the head). The stem is conv2d 3x3, 16, HS, stride 2.
STEM_FEATURES = 16
HEAD = (
    BneckSpec(3, 16, 16, False, "RE", 2),
    BneckSpec(3, 72, 24, False, "RE", 2),
    BneckSpec(1, 88, 24, False, "RE", 1),
    BneckSpec(1, 96, 40, True, "HS", 1),
    BneckSpec(1, 240, 40, True, "HS", 1),
    BneckSpec(1, 240, 40, True, "HS", 1),
    BneckSpec(1, 120, 48, True, "HS", 1),
    BneckSpec(3, 144, 48, True, "HS", 1),
    BneckSpec(3, 288, 96, True, "HS", 1),
)
# AnchorNet Table 2: the first two rows of each block build the localization features ...
BRANCHES = {
    63: (BneckSpec(3, 480, 96, True, "HS", 1), BneckSpec(1, 576, 96, True, "HS", 1)),
    95: (BneckSpec(3, 480, 96, True, "HS", 1), BneckSpec(5, 576, 96, True, "HS", 1)),
    111: (BneckSpec(5, 480, 96, True, "HS", 1), BneckSpec(5, 576, 96, True, "HS", 1)),
}
# ... and the last row of each block is the bottleneck of the attention branch.
ATTENTION = BneckSpec(1, 192, 96, True, "HS", 1)

# Initialisation is torchvision's MobileNetV3: convs (SE included) He-normal fan_out, BatchNorm 1/0, zero biases
# (bagjax.models.layers), and normal(0, 0.01) for its nn.Linear classifier. The per-location classifiers here -- the
# class-map conv F, the auxiliary FC and the attention's 1x1 scoring conv -- get that classifier rule.
small_init = nn.initializers.normal(0.01)


def grid_size(size: int, rf: int) -> int:
    """Locations along one axis for ``size`` input pixels (section 3.1: floor((size - rf) / 8) + 1)."""
    return (size - rf) // STRIDE + 1


def pool_logits(class_maps: jax.Array, attention: jax.Array, pooling: str = "sum") -> jax.Array:
    """Image logits from F (B, H, W, C) and S (B, H, W): ``sum_hw F * S``, or its mean over H*W for 'mean'."""
    logits = jnp.einsum("bhwc,bhw->bc", class_maps, attention)
    return logits / (class_maps.shape[1] * class_maps.shape[2]) if pooling == "mean" else logits


def spatial_softmax(x: jax.Array) -> jax.Array:
    """Softmax of (B, H, W) scores over all H*W locations (Eq. 1 and 5), written out as ``jax.nn.softmax`` computes it.

    The same numbers as ``jax.nn.softmax(x, axis=(1, 2))`` (shift by the max, exp, divide by the sum). Written
    with plain reductions because ONNX's Softmax takes one axis and flattening H*W is not expressible for a
    symbolic image size, so the exported graph (``bagjax.export``) keeps any input size.
    """
    e = jnp.exp(x - jax.lax.stop_gradient(jnp.max(x, axis=(1, 2), keepdims=True)))
    return e / jnp.sum(e, axis=(1, 2), keepdims=True)


class SpatialAttention(nn.Module):
    """Attention of AnchorNet section 3.2, Eq. 1-5: X (B, H, W, C) -> S (B, H, W), summing to 1 over H, W.

    The 1x1 conv compacting X to G~ has no bias: a constant shift cancels in the spatial softmax (Eq. 1).
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        g = nn.Conv(1, (1, 1), use_bias=False, kernel_init=small_init, name="compact")(x)[..., 0]
        g = spatial_softmax(g)  # Eq. 1
        c = jnp.einsum("bhwc,bhw->bc", x, g)  # Eq. 2
        c = jax.nn.softmax(c, axis=-1)  # Eq. 3
        s = jnp.einsum("bhwc,bc->bhw", x, c)  # Eq. 4
        return spatial_softmax(s)  # Eq. 5


class LocalizationBranch(nn.Module):
    """One branch B^rf of AnchorNet Table 2 with its attention branch (Figure 2)."""

    rf: int
    num_classes: int
    pooling: str = "sum"
    bn_momentum: float = BN_MOMENTUM
    dtype: jnp.dtype = jnp.float32
    se_size: str = SE_SIZE

    @nn.compact
    def __call__(self, h: jax.Array, train: bool) -> dict[str, jax.Array]:
        z = h
        for i, spec in enumerate(BRANCHES[self.rf]):
            z = Bneck(*spec, bn_momentum=self.bn_momentum, se_size=self.se_size, dtype=self.dtype,
                      name=f"bneck{i}")(z, train)
        f = nn.Conv(self.num_classes, (1, 1), kernel_init=small_init, dtype=self.dtype,
                    name="classifier")(z).astype(jnp.float32)
        x = Bneck(*ATTENTION, bn_momentum=self.bn_momentum, se_size=self.se_size, dtype=self.dtype,
                  name="attention_bneck")(z, train)
        s = SpatialAttention(name="attention")(x)
        out = {"logits": pool_logits(f, s, self.pooling), "class_maps": f, "attention": s}
        if train or self.is_initializing():
            gap = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
            aux = nn.Dense(self.num_classes, kernel_init=small_init, name="aux_classifier")(gap)
            if train:
                out["aux_logits"] = aux
        return out


class AnchorNet(nn.Module):
    """Three-branch AnchorNet (Figure 2, Tables 1 and 2).

    ``apply(variables, x, train=False)`` returns ``{'logits': {rf: (B, C)}, 'class_maps': {rf: (B, H, W, C)},
    'attention': {rf: (B, H, W)}}`` for rf in ``RECEPTIVE_FIELDS``; ``train=True`` (with
    ``mutable=['batch_stats']``) adds ``'aux_logits': {rf: (B, C)}``. Inputs are NHWC, at least 111 px a side.
    """

    num_classes: int
    pooling: str = "sum"
    bn_momentum: float = BN_MOMENTUM
    dtype: jnp.dtype = jnp.float32
    se_size: str = SE_SIZE

    # No head-only training on cached features (bagjax.training.features): each branch's classifier acts on
    # attention-weighted class maps, and there is no single 'head' whose input one vector per image could hold.
    cacheable_head = False

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise UserError(f"unknown AnchorNet pooling {self.pooling!r}: choose one of {', '.join(POOLINGS)}")
        if self.se_size not in SE_SIZES:
            raise UserError(f"unknown AnchorNet se_size {self.se_size!r}: choose one of {', '.join(SE_SIZES)}")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise UserError(f"AnchorNet bn_momentum must be in [0, 1) (Flax convention: the weight of the old "
                            f"running average); got {self.bn_momentum}")
        super().__post_init__()

    @property
    def receptive_field(self) -> int:
        """The largest branch's receptive field, hence the smallest input side AnchorNet takes (section 3.1)."""
        return MIN_INPUT

    @property
    def stride(self) -> int:
        return STRIDE

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> dict[str, dict[int, jax.Array]]:
        if x.ndim != 4 or x.shape[1] < MIN_INPUT or x.shape[2] < MIN_INPUT:  # each side (symbolic sizes too)
            raise UserError(f"AnchorNet needs NHWC images of at least {MIN_INPUT}x{MIN_INPUT} px "
                            f"(its largest receptive field); got shape {tuple(x.shape)}")
        h = ConvBN(STEM_FEATURES, 3, 2, activation="HS", bn_momentum=self.bn_momentum, dtype=self.dtype,
                   name="stem")(x.astype(self.dtype), train)
        for i, spec in enumerate(HEAD):
            h = Bneck(*spec, bn_momentum=self.bn_momentum, se_size=self.se_size, dtype=self.dtype,
                      name=f"head{i}")(h, train)
        outputs: dict[str, dict[int, jax.Array]] = {}
        for rf in RECEPTIVE_FIELDS:
            branch = LocalizationBranch(rf, self.num_classes, self.pooling, self.bn_momentum, self.dtype,
                                        self.se_size, name=f"branch{rf}")(h, train)
            for key, value in branch.items():
                outputs.setdefault(key, {})[rf] = value
        return outputs


def anchornet(*, num_classes: int, head: str = "learned", dtype: Any = jnp.float32, **kw: Any) -> AnchorNet:
    """Factory for ``create_model('anchornet', ...)``; ``kw`` may set ``pooling`` ('sum' or 'mean'),
    ``bn_momentum`` (Flax convention; default 0.99 as torchvision's MobileNetV3, 0.9 for short runs) and
    ``se_size`` ('output', 'input' or 'expansion'; see the module docstring)."""
    if head != "learned":
        raise UserError(f"AnchorNet only supports head='learned' (its classifier is the per-branch linear "
                        f"1x1 conv of Table 2); got head={head!r}")
    return AnchorNet(num_classes=num_classes, dtype=jnp.dtype(dtype), **kw)


def _cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def training_loss(outputs: dict[str, dict[int, jax.Array]], labels: jax.Array, *, aux_weight: float = 1.0,
                  label_smoothing: float = 0.0) -> jax.Array:
    """Batch mean of the summed branch cross-entropies plus ``aux_weight`` x the summed auxiliary ones.

    Section 3.2: every branch and (in training) every attention branch's FC is supervised by cross-entropy
    with the image label. The auxiliary term is included when ``outputs`` has ``'aux_logits'`` (train=True).
    """
    loss = sum(_cross_entropy(outputs["logits"][rf], labels, label_smoothing) for rf in RECEPTIVE_FIELDS)
    if "aux_logits" in outputs:
        loss = loss + aux_weight * sum(_cross_entropy(outputs["aux_logits"][rf], labels, label_smoothing)
                                       for rf in RECEPTIVE_FIELDS)
    return jnp.mean(loss)


def image_logits(outputs: dict[str, dict[int, jax.Array]]) -> jax.Array:
    """(B, C) scores for accuracy/top-5: the mean of the three branches' log-softmaxes.

    That is the log of the (unnormalized) geometric mean of the branch distributions B^j (section 3.3), a
    single ranking in which no branch's logit scale dominates. The paper's own per-image class is the vote of
    Eq. 7, see ``bagjax.localize.branch_decision``.
    """
    return jnp.mean(jnp.stack([jax.nn.log_softmax(outputs["logits"][rf].astype(jnp.float32), axis=-1)
                               for rf in RECEPTIVE_FIELDS]), axis=0)
