"""Model registry: ``create_model(name, *, num_classes, head='learned', dtype=..., **kw)``.

Names: ``bagnet9``, ``bagnet17``, ``bagnet33`` (Brendel & Bethge 2019), ``resnet50`` (torchvision) and
``anchornet`` (Yang et al.). Heads: ``learned``, ``orthogonal``, ``orthogonal_hoffer``, ``hadamard``,
``identity`` (Qian 2020; Hoffer et al. 2018).
``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters and logits stay float32. Every model returns
``(logits, aux)`` and declares its ``capabilities`` (``bagjax.models.contract``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from bagjax.models.bagnet import KERNEL3, BagNet
from bagjax.models.clip import config_clip, parse_clip
from bagjax.models.contract import Capabilities
from bagjax.models.heads import HEADS
from bagjax.models.resnet import ResNet50
from bagjax.errors import UserError

__all__ = ["MODELS", "HEADS", "Capabilities", "create_model", "build_model", "capabilities"]


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
    """The model a training config describes (``model``, ``head``, ``dtype``, ``model_kwargs``), with ``num_classes``;
    ``robust.clip`` makes a model with patch logits aggregate them as Clipped BagNet (``bagjax.models.clip``)."""
    model = create_model(config.model, num_classes=num_classes, head=config.head, dtype=config.dtype,
                         **dict(config.get("model_kwargs", {})))
    clip = config_clip(config)
    if not clip:
        return model
    if not model.capabilities.patch_logits:
        raise UserError(f"config.robust.clip={clip!r} clips patch logits and needs a BagNet, not {config.model}: "
                        "set config.robust.clip=''")
    return model.clone(clip=parse_clip(clip).name)  # an unknown spec is refused here, before anything compiles


def capabilities(name: str, **kw: Any) -> Capabilities:
    """The declared capabilities of a registered model (``receptive_field``, ``stride``, ...)."""
    return create_model(name, num_classes=1, **kw).capabilities
