"""Model registry: ``create_model(name, *, num_classes, head='learned', dtype=..., **kw)``.

Names: ``bagnet9``, ``bagnet17``, ``bagnet33`` (Brendel & Bethge 2019), ``resnet50`` (torchvision) and
``anchornet`` (Yang et al.). Heads: ``learned``, ``orthogonal``, ``orthogonal_hoffer``, ``hadamard``,
``identity`` (Qian 2020; Hoffer et al. 2018).
``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters and logits stay float32.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from bagjax.models.bagnet import KERNEL3, BagNet
from bagjax.models.heads import HEADS
from bagjax.models.resnet import ResNet50
from bagjax.errors import UserError

__all__ = ["MODELS", "HEADS", "create_model", "build_model", "receptive_field", "is_bagnet"]


def _anchornet(**kw: Any) -> nn.Module:
    from bagjax.models.anchornet import anchornet  # imported lazily: only AnchorNet users pay for it

    return anchornet(**kw)


MODELS: dict[str, Callable[..., nn.Module]] = {
    **{name: functools.partial(BagNet, kernel3) for name, kernel3 in KERNEL3.items()},
    "resnet50": ResNet50,
    "anchornet": _anchornet,
}


def create_model(name: str, *, num_classes: int, head: str = "learned", dtype: Any = jnp.float32,
                 **kw: Any) -> nn.Module:
    """Build a registered model; extra keywords (``width``, ``stage_sizes``, ``identity_expand``) go to it."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}  # hashable modules (e.g. from JSON)
    return MODELS[name](num_classes=num_classes, head=head, dtype=jnp.dtype(dtype), **kw)


def build_model(config: Any, num_classes: int) -> nn.Module:
    """The model a training config describes (``model``, ``head``, ``dtype``, ``model_kwargs``), with ``num_classes``."""
    return create_model(config.model, num_classes=num_classes, head=config.head, dtype=config.dtype,
                        **dict(config.get("model_kwargs", {})))


def is_bagnet(name: str) -> bool:
    return name in KERNEL3


def receptive_field(name: str, **kw: Any) -> tuple[int, int]:
    """(receptive field, stride) in input pixels of a BagNet; AnchorNet's largest branch for ``anchornet``."""
    model = create_model(name, num_classes=1, **kw)
    if hasattr(model, "receptive_field"):
        return model.receptive_field, model.stride
    raise UserError(f"{name!r} has no bounded receptive field; BagNets and AnchorNet do")
