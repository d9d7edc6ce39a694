"""Clipped BagNet aggregation (Zhang, Yuan, Mueller, Kolter, "Clipped BagNet", 2020): image logits as the mean of
a bounded function ``phi`` of the patch logits instead of their plain mean.

It is how a BagNet is trained for the clip defense (``config.robust.clip``, a ``BagNet(clip=...)`` field) and
what ``bagjax.robust`` certifies; it lives with the models so that training needs nothing from ``robust``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from bagjax.errors import UserError

CBN_ALPHA, CBN_BETA = 0.05, -1.0  # Clipped BagNet's tanh(alpha * x + beta)


class Clip(NamedTuple):
    """A bounded function of local logits, ``phi(x)`` in ``[low, high]`` (Clipped BagNet)."""

    name: str
    fn: Callable[[jax.Array], jax.Array]
    low: float
    high: float


def parse_clip(spec: str) -> Clip:
    """``cbn`` (Zhang et al.: ``tanh(0.05 x - 1)``), ``cbn:A,B`` (``tanh(A x + B)``) or ``clamp:LO,HI``."""
    name, _, args = spec.partition(":")
    try:
        values = [float(v) for v in args.split(",")] if args else []
    except ValueError:
        values = None
    if name == "cbn" and values is not None and len(values) in (0, 2):
        alpha, beta = values or (CBN_ALPHA, CBN_BETA)
        return Clip(spec, lambda x: jnp.tanh(alpha * x + beta), -1.0, 1.0)
    if name == "clamp" and values is not None and len(values) == 2 and values[0] < values[1]:
        low, high = values
        return Clip(spec, lambda x: jnp.clip(x, low, high), low, high)
    raise UserError(f"unknown clip {spec!r}: use cbn, cbn:ALPHA,BETA (tanh(ALPHA x + BETA)) or clamp:LO,HI (LO < HI)")


def clipped_logits(patch_logits: jax.Array, clip: Clip) -> jax.Array:
    """Clipped BagNet's image logits: the mean of ``phi`` over the grid, ``(..., H', W', C) -> (..., C)``."""
    return clip.fn(patch_logits).mean(axis=(-3, -2))


def config_clip(config: Any) -> str:
    """``config.robust.clip`` of a training config: a ``parse_clip`` spec, or ``""`` for the plain mean."""
    section = config.get("robust")
    return str(section.get("clip", "")) if section is not None else ""
