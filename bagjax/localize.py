"""AnchorNet's decision rule (Eq. 6-8) and Localizing Semantic Patches (LSP, Algorithm 1), as pure jax functions.

Everything here is jit-able and batches with ``jax.vmap`` (``branch_decision`` also broadcasts over leading
axes), so an experiment is: model outputs -> ``localize_patches`` -> ``crop_patches`` -> downstream classifier.
"""

from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bagjax.models.anchornet import RECEPTIVE_FIELDS, STRIDE
from bagjax.errors import UserError


class LSPSettings(NamedTuple):
    """Per-branch LSP parameters of Algorithm 1: K (max_patches), T (iou_threshold), P (coverage)."""

    max_patches: int
    iou_threshold: float
    coverage: float


# AnchorNet section 4.1: settings for visualizing patches, and the slacker ones for downstream classification.
LSP_VISUALIZATION = {63: LSPSettings(5, 0.3, 0.05), 95: LSPSettings(3, 0.3, 0.04), 111: LSPSettings(2, 0.3, 0.03)}
LSP_SLACK = {63: LSPSettings(24, 0.8, 0.3), 95: LSPSettings(10, 0.8, 0.3), 111: LSPSettings(8, 0.8, 0.3)}


def branch_decision(logits: Mapping[int, jax.Array], class_maps: Mapping[int, jax.Array]
                    ) -> tuple[jax.Array, jax.Array, dict[int, jax.Array]]:
    """Class gamma and localization branch B^theta of AnchorNet section 3.3, Eq. 6-8.

    ``logits[rf]`` is ``(..., C)`` and ``class_maps[rf]`` ``(..., H_rf, W_rf, C)`` for rf in
    ``RECEPTIVE_FIELDS`` (leading batch axes broadcast). Returns ``(cls, branch, heatmaps)``:

    - Eq. 6: per branch, Y^j = argmax_y B^j_y and the confidence P^j = max_y B^j_y, where B^j = softmax(logits).
    - Eq. 7: cls is the class at least two branches predict, else Y^j of the branch with the largest P^j.
    - Eq. 8: branch = argmax_j [(P^j == B^j_cls) * P^j], the most confident branch among those whose top
      probability is cls's; an index into ``RECEPTIVE_FIELDS`` (int32). Ties go to the smaller receptive field.
    - heatmaps: ``{rf: F^rf[..., cls]}`` of shape ``(..., H_rf, W_rf)`` for every branch, because the grids
      differ in shape; the paper's M^theta is ``heatmaps[RECEPTIVE_FIELDS[branch]]``. M^theta is F^theta itself
      (section 3.3, "equal to F^theta_{:,:,gamma}"), the 1x1 class conv's map before the attention map S
      multiplies it (section 3.2), as the paper's text says; the image logit sums F * S, so a patch's exact
      share of it would be F * S instead.
    """
    probs = jnp.stack([jax.nn.softmax(logits[rf].astype(jnp.float32), axis=-1) for rf in RECEPTIVE_FIELDS],
                      axis=-2)  # (..., 3, C)
    y = jnp.argmax(probs, axis=-1)  # Eq. 6, Y^j
    p = jnp.max(probs, axis=-1)  # Eq. 6, P^j
    votes = jnp.sum(y[..., :, None] == y[..., None, :], axis=-1)  # branches predicting the same class as j
    majority = votes >= 2
    voted = jnp.take_along_axis(y, jnp.argmax(majority, axis=-1)[..., None], axis=-1)[..., 0]
    confident = jnp.take_along_axis(y, jnp.argmax(p, axis=-1)[..., None], axis=-1)[..., 0]
    cls = jnp.where(jnp.any(majority, axis=-1), voted, confident)  # Eq. 7
    p_cls = jnp.take_along_axis(probs, cls[..., None, None], axis=-1)[..., 0]  # B^j_cls
    branch = jnp.argmax(jnp.where(p == p_cls, p, 0.0), axis=-1).astype(jnp.int32)  # Eq. 8
    heatmaps = {rf: jnp.take_along_axis(class_maps[rf], cls[..., None, None, None], axis=-1)[..., 0]
                for rf in RECEPTIVE_FIELDS}
    return cls.astype(jnp.int32), branch, heatmaps


def num_candidates(height: int, width: int, coverage: float) -> int:
    """floor(H * W * P), the last rank Algorithm 1 visits (line 3); 1e-9 absorbs binary rounding of P."""
    return max(1, math.floor(height * width * coverage + 1e-9))


def max_intersection(patch_size: int, iou_threshold: float) -> int:
    """Largest pixel intersection of two ``patch_size`` squares whose IoU (Eq. 9) is still < T, or -1.

    All LSP boxes have the same area A, so IoU = I / (2A - I) grows with the intersection I; testing
    ``I <= max_intersection`` in int32 is then exactly the float64 test ``I / (2A - I) < T``.
    """
    area = patch_size * patch_size
    lo, hi = -1, area  # invariant: I = lo passes (or lo == -1), every I > hi fails
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid / (2 * area - mid) < iou_threshold:
            lo = mid
        else:
            hi = mid - 1
    return lo


def lsp(heatmap: jax.Array, *, patch_size: int, stride: int, max_patches: int, iou_threshold: float,
        coverage: float) -> tuple[jax.Array, jax.Array]:
    """Localizing Semantic Patches, AnchorNet Algorithm 1, on one ``(H, W)`` heatmap M^theta.

    Locations are ranked by heatmap value, descending, ties by row-major flat index ascending (heatmap values
    must be finite; -0.0 counts as 0.0). The top location is always picked (line 2); ranks 2 ..
    floor(H*W*P) (1-based) are then visited in order and a location is picked when its box's IoU with every
    box picked so far is strictly below T (line 4), until K boxes are picked (line 6). Location (i, j) maps to
    the box ``(stride*i, stride*j, stride*i + patch_size, stride*j + patch_size)`` (section 3.1); IoU counts
    pixels (Eq. 9) and is evaluated exactly in integers (see ``max_intersection``).

    Unlike the authors' public code, which skips the IoU test for a candidate at flat index 0 (the top-left
    location), every candidate after the first pick is tested here, as Algorithm 1 states.

    Returns ``boxes`` ``(max_patches, 4)`` int32 ``(y0, x0, y1, x1)`` in input pixels, half-open, in pick
    order (unused rows are zero), and ``valid`` ``(max_patches,)`` bool. A ``lax.while_loop``: jit and vmap it.
    """
    if heatmap.ndim != 2:
        raise UserError(f"lsp takes one (H, W) heatmap; got shape {heatmap.shape} (vmap it for batches)")
    if min(patch_size, stride, max_patches) < 1:
        raise UserError(f"patch_size, stride and max_patches must be >= 1; got {patch_size}, {stride}, "
                        f"{max_patches}")
    if not 0.0 < coverage <= 1.0:
        raise UserError(f"coverage P must be in (0, 1]; got {coverage}")
    height, width = heatmap.shape
    n = num_candidates(height, width, coverage)
    limit = max_intersection(patch_size, iou_threshold)
    flat = heatmap.reshape(-1)
    flat = jnp.where(flat == 0, jnp.zeros_like(flat), flat)  # -0.0 and 0.0 must tie
    order = jnp.argsort(-flat, stable=True)[:n].astype(jnp.int32)
    ys, xs = (order // width) * stride, (order % width) * stride
    candidates = jnp.stack([ys, xs, ys + patch_size, xs + patch_size], axis=-1)  # (n, 4)
    boxes = jnp.zeros((max_patches, 4), jnp.int32).at[0].set(candidates[0])
    slots = jnp.arange(max_patches)

    def keep_going(state):
        rank, count, _ = state
        return (rank < n) & (count < max_patches)

    def visit(state):
        rank, count, boxes = state
        box = candidates[rank]
        overlap = (jnp.maximum(0, patch_size - jnp.abs(boxes[:, 0] - box[0]))
                   * jnp.maximum(0, patch_size - jnp.abs(boxes[:, 1] - box[1])))
        accept = ~jnp.any((slots < count) & (overlap > limit))
        boxes = jnp.where(accept, boxes.at[count].set(box), boxes)
        return rank + 1, count + accept.astype(jnp.int32), boxes

    _, count, boxes = lax.while_loop(keep_going, visit, (jnp.int32(1), jnp.int32(1), boxes))
    return boxes, slots < count


def localize_patches(outputs: Mapping[str, Mapping[int, jax.Array]],
                     settings: Mapping[int, LSPSettings] = LSP_SLACK) -> dict[str, jax.Array]:
    """Eq. 6-8 then Algorithm 1 on the chosen branch, for a batch of AnchorNet outputs (section 3.3).

    Returns ``cls`` (B,), ``branch`` (B,) index into ``RECEPTIVE_FIELDS``, ``patch_size`` (B,) in pixels,
    ``boxes`` (B, K, 4) int32 and ``valid`` (B, K) bool with K the largest ``max_patches`` in ``settings``.
    LSP runs on all three branches (it is cheap) and each image keeps the result of its own branch.
    """
    cls, branch, heatmaps = branch_decision(outputs["logits"], outputs["class_maps"])
    k = max(s.max_patches for s in settings.values())
    boxes, valid = [], []
    for rf in RECEPTIVE_FIELDS:
        s = settings[rf]
        b, v = jax.vmap(lambda m: lsp(m, patch_size=rf, stride=STRIDE, max_patches=s.max_patches,
                                      iou_threshold=s.iou_threshold, coverage=s.coverage))(heatmaps[rf])
        boxes.append(jnp.pad(b, ((0, 0), (0, k - s.max_patches), (0, 0))))
        valid.append(jnp.pad(v, ((0, 0), (0, k - s.max_patches))))
    pick = jnp.arange(len(RECEPTIVE_FIELDS)) == branch[:, None]  # (B, 3) one-hot
    return {
        "cls": cls,
        "branch": branch,
        "patch_size": jnp.asarray(RECEPTIVE_FIELDS, jnp.int32)[branch],
        "boxes": jnp.einsum("jbkd,bj->bkd", jnp.stack(boxes), pick.astype(jnp.int32)),
        "valid": jnp.any(jnp.stack(valid, axis=-1) & pick[:, None, :], axis=-1),
    }


def crop_patches(images: jax.Array, boxes: jax.Array, valid: jax.Array, *, patch_size: int,
                 out_size: int | None = None) -> jax.Array:
    """Cut ``patch_size`` squares at ``boxes`` (B, K, 4) from ``images`` (B, H, W, C) -> (B, K, S, S, C).

    Invalid slots come back as zeros; ``out_size`` (S) bilinearly resizes the patches, else S = patch_size.
    Boxes from ``lsp`` on an AnchorNet map of the same image never cross the border: with unpadded convs the
    last location of an axis of n pixels starts at 8 * floor((n - rf) / 8) <= n - rf (section 3.1). A box
    that does cross it is shifted inside by ``lax.dynamic_slice``'s clamping.
    """
    if images.shape[1] < patch_size or images.shape[2] < patch_size:
        raise UserError(f"patch_size {patch_size} exceeds the image size {images.shape[1:3]}")
    channels = images.shape[-1]

    def crop(image, box):
        return lax.dynamic_slice(image, (box[0], box[1], 0), (patch_size, patch_size, channels))

    patches = jax.vmap(jax.vmap(crop, in_axes=(None, 0)))(images, boxes)
    if out_size is not None and out_size != patch_size:
        patches = jax.image.resize(patches, patches.shape[:2] + (out_size, out_size, channels), "bilinear")
    return jnp.where(valid[:, :, None, None, None], patches, jnp.zeros_like(patches))
