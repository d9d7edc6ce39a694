"""Receptive-field geometry of BagNets and per-patch evaluation by ``jax.vmap``.

Brendel & Bethge (ICLR 2019), section 3: with unpadded convs, output location (i, j) of a BagNet sees exactly
the input box ``[stride*i, stride*i + rf) x [stride*j, stride*j + rf)``. This module is the one place that turns
a model into that geometry; heatmaps, blackout and cropping ask here. ``per_patch_logits`` runs the network on
each extracted rf x rf patch separately, which equals the dense ``patch_logits`` up to float rounding: the
bag-of-local-features property made executable.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bagjax.errors import UserError


def _check_bagnet(model: nn.Module) -> None:
    if not hasattr(model, "receptive_field") or not hasattr(model, "patch_logits"):
        raise UserError(f"{type(model).__name__} is not a BagNet: patch geometry needs a bounded receptive field")


def receptive_field(model: nn.Module) -> tuple[int, int]:
    """``(rf, stride)`` in input pixels: (9, 8), (17, 8) or (33, 8) for BagNet-9/17/33."""
    _check_bagnet(model)
    return model.receptive_field, model.stride


def grid_shape(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    """The patch grid ``(H', W')`` of a ``height x width`` input; raises if the input is below the rf."""
    rf, _ = receptive_field(model)
    if height < rf or width < rf:
        raise UserError(f"a {height}x{width} image is smaller than the {rf}x{rf} px receptive field: "
                        f"use images of at least {rf} px")
    return model.grid_shape(height, width)


def patch_boxes(model: nn.Module, height: int, width: int) -> np.ndarray:
    """Pixel box ``(y0, x0, y1, x1)`` (half-open) of every location: int array ``(H', W', 4)``."""
    rf, stride = receptive_field(model)
    gh, gw = grid_shape(model, height, width)
    i, j = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([stride * i, stride * j, stride * i + rf, stride * j + rf], axis=-1).astype(np.int32)


def all_locations(model: nn.Module, height: int, width: int) -> np.ndarray:
    """Every grid location ``(i, j)`` in row-major order: int array ``(H' * W', 2)``."""
    gh, gw = grid_shape(model, height, width)
    return np.stack(np.unravel_index(np.arange(gh * gw), (gh, gw)), axis=-1).astype(np.int32)


def extract_patches(images: jax.Array, locations: jax.Array, *, rf: int, stride: int) -> jax.Array:
    """Crop the ``rf x rf`` patch of each location: images ``(B, H, W, 3)``, locations ``(N, 2)`` -> ``(B, N, rf, rf, 3)``."""

    def crop(image: jax.Array, loc: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(image, (loc[0] * stride, loc[1] * stride, 0), (rf, rf, image.shape[-1]))

    return jax.vmap(jax.vmap(crop, in_axes=(None, 0)), in_axes=(0, None))(images, locations)


def per_patch_logits(model: nn.Module, variables: Any, images: jax.Array,
                     locations: jax.Array | np.ndarray | None = None) -> jax.Array:
    """Logits of each patch evaluated on its own, by ``jax.vmap`` over the extracted patches.

    With ``locations=None`` every location is evaluated and the result has the dense shape
    ``(B, H', W', C)``; otherwise ``locations`` is ``(N, 2)`` grid indices and the result is ``(B, N, C)``.
    Only the requested patches are computed, which is what sparse evaluation (blackout) relies on.
    """
    rf, stride = receptive_field(model)
    height, width = images.shape[1:3]
    dense = locations is None
    if dense:
        locations = all_locations(model, height, width)
    locations = jnp.asarray(locations, jnp.int32)
    patches = extract_patches(images, locations, rf=rf, stride=stride)

    def one_patch(patch: jax.Array) -> jax.Array:
        return model.apply(variables, patch[None], train=False, method="patch_logits")[0, 0, 0]

    logits = jax.vmap(jax.vmap(one_patch))(patches)
    if dense:
        return logits.reshape(images.shape[0], *grid_shape(model, height, width), -1)
    return logits
