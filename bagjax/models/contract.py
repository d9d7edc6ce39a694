"""The one model contract: what every model returns, and what it declares it can do.

Every registered model's ``model.apply(variables, images, train=...)`` returns ``(logits, aux)``: the image
logits ``(B, C)`` the metrics rank, and ``aux``, a dict of named extras (empty for BagNet and ResNet-50;
AnchorNet's branch ``logits``, ``class_maps``, ``attention`` and, in training, ``aux_logits``, each keyed by
the branch receptive field). Each model's ``capabilities`` property is a ``Capabilities``: callers (training,
patches, robust, interpret, explore, export, the experiments) ask it, never the model's name or ``hasattr``.

Patch geometry (Brendel & Bethge, ICLR 2019, section 3; AnchorNet section 3.1): with unpadded convs, output
location ``i`` of a model whose receptive field is ``rf`` and stride ``s`` sees pixels ``[s*i, s*i + rf)``, so
an axis of ``size`` pixels holds ``(size - rf) // s + 1`` locations (``grid_size``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy with optional label smoothing."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing) \
        if label_smoothing else jax.nn.one_hot(labels, logits.shape[-1])
    return optax.softmax_cross_entropy(logits, targets)


def classification_loss(logits: jax.Array, aux: dict[str, Any], labels: jax.Array, *, label_smoothing: float = 0.0,
                        aux_weight: float = 1.0) -> jax.Array:
    """The batch-mean cross-entropy of the image logits: the training loss of every single-output classifier."""
    del aux, aux_weight  # no extra outputs to supervise
    return cross_entropy(logits, labels, label_smoothing).mean()


def grid_size(size: int, rf: int, stride: int) -> int:
    """Output locations along an axis of ``size`` input pixels for an unpadded conv chain of ``(rf, stride)``."""
    return (size - rf) // stride + 1


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a model declares beyond ``(logits, aux) = model.apply(...)``.

    - ``patch_logits``: ``apply(..., method='patch_logits')`` gives ``(B, H', W', C)`` per-location evidence,
      whose mean (or, for a Clipped BagNet, the mean of its clipped values) are the image logits.
    - ``features``: ``apply(..., method='features')`` gives the feature map the head acts on (a class
      activation map is the head applied per location).
    - ``receptive_field``, ``stride``: every output location sees a bounded ``rf x rf`` box at this stride
      (AnchorNet: its largest branch, hence its smallest input side); None when unbounded (ResNet-50).
    - ``head``: the kind of classifier head (``bagjax.models.heads``) applied per location or to the pooled
      feature; None when the model has no single head (AnchorNet's per-branch classifiers).
    - ``num_features``: the channels the head acts on (the ``identity`` head needs at least ``num_classes``).
    - ``branches``: the branch receptive fields keying AnchorNet's ``aux`` maps; empty for other models.
    - ``loss``: the training loss ``loss(logits, aux, labels, *, label_smoothing, aux_weight)``, a batch mean.
    - ``cacheable_head``: the image logits follow from one vector per image through the head alone,
      ``apply(..., method='pooled_features')`` (``(B, n_c)``), so head-only training can cache it
      (``bagjax.training.features``); ``pooled_normalized``: that vector is already a mean of L2-normalised
      features, which the head then takes as it is (``Head(...)(pooled, normalized=True)``).
    """

    patch_logits: bool = False
    features: bool = False
    receptive_field: int | None = None
    stride: int | None = None
    head: str | None = None
    num_features: int | None = None
    branches: tuple[int, ...] = ()
    loss: Callable[..., jax.Array] = classification_loss
    cacheable_head: bool = False
    pooled_normalized: bool = False

    def grid_shape(self, height: int, width: int) -> tuple[int, int]:
        """The output grid ``(H', W')`` of a ``height x width`` input (bounded receptive fields only)."""
        return grid_size(height, self.receptive_field, self.stride), grid_size(width, self.receptive_field, self.stride)
