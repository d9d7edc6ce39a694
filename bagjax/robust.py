"""Provable robustness of a BagNet to one adversarial patch: PatchGuard robust masking and Clipped BagNet.

A BagNet's logit at grid location (i, j) sees only the input box ``[s*i, s*i + rf) x [s*j, s*j + rf)``
(``bagjax.patches``), so a ``p x p`` patch can change at most ``ceil((p + rf - 1) / s)`` consecutive locations
per axis: a *window* of the logit grid (Xiang et al., PatchGuard, USENIX Security 2021, section 3.2). Robust
aggregation of the patch logits bounds what any content of that window can do, which gives a certificate:

- **Robust masking** (PatchGuard, Algorithm 1): clip each local logit to ``[0, c_h]``; for every class, find the
  window with the largest clipped evidence and subtract it when it holds more than a fraction ``T`` of the
  class total (detection). Provable analysis (Algorithm 2, Lemmas 1-2), re-derived here for every window ``w``
  the patch may occupy: a wrong class keeps at most ``t / (1 - T)``, with ``t`` its evidence outside ``w``;
  the true class keeps at least ``S0 - M0``, where ``S0`` is its evidence outside ``w`` and ``M0`` the largest
  window sum of that evidence with ``w`` zeroed when that window is detected (``M0 > T * S0``), else the largest
  such sum over the windows that *overlap* ``w``: an attacker who adds true-class evidence in ``w`` can only
  trigger a detection of a window that contains some of ``w`` (PatchGuard's ``provable_masking`` since its
  12/2021 fix; the code before it subtracted nothing there, which such an attacker breaks). An image whose
  undefended clipped sum already predicts a wrong class is not certified (``provable_masking`` returns 0).
- **Clipped BagNet** (Zhang et al. 2020): local logits pass through a bounded function ``phi`` with range
  ``[lo, hi]`` (their ``tanh(0.05 x - 1)``) before the mean. Inside the window a patch can lower each location's
  margin ``phi_y - phi_c`` to ``lo - hi`` at worst; outside it the margin is fixed. Certified when, for
  every window and *every* other class, ``sum_outside(phi_y - phi_c) - |w| (hi - lo)`` stays positive.
  (PatchGuard's ``provable_clipping`` checks only the runner-up class, which a third class can beat.)

Ties are broken as PatchGuard breaks them (``predicted_class``): robust masking predicts the largest class index
among tied classes (``np.argsort(kind='stable')[-1]``), Clipped BagNet and the plain mean the smallest
(``np.argmax``). The one difference left on purpose: a certificate needs its worst-case margin to exceed a
float32 rounding bound (``rounding_tolerance``), so an exact tie never certifies (PatchGuard certifies a tie
that its index order wins; which class wins it in floats depends on rounding). Every function below is pure and
works on one image; ``jax.vmap`` them over a batch (``certify`` does).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bagjax import patches
from bagjax.errors import UserError

DEFENSES = ("none", "mask", "clip")
CBN_ALPHA, CBN_BETA = 0.05, -1.0  # Clipped BagNet's tanh(alpha * x + beta)


# ----------------------------------------------------------------------------------------------- geometry
def window_size(patch_px: int, rf: int, stride: int) -> int:
    """Grid locations a ``patch_px`` px patch can touch along one axis: ``ceil((p + rf - 1) / stride)``.

    Location i sees pixels ``[s*i, s*i + rf)``; it meets the patch ``[a, a + p)`` iff ``s*i`` lies in the
    ``p + rf - 1`` integers ``[a - rf + 1, a + p - 1]``, which hold at most ``ceil((p + rf - 1) / s)`` multiples of s.
    """
    if patch_px < 1:
        raise UserError(f"the patch must be at least 1 px, got {patch_px}")
    return -(-(patch_px + rf - 1) // stride)


def window_shape(model: nn.Module, patch_px: int, height: int, width: int) -> tuple[int, int]:
    """The window ``(wy, wx)`` of a square ``patch_px`` patch on the model's grid, at most the grid itself."""
    rf, stride = patches.receptive_field(model)
    if patch_px > min(height, width):
        raise UserError(f"a {patch_px} px patch does not fit a {height}x{width} image: use a smaller --patch-size")
    gh, gw = patches.grid_shape(model, height, width)
    w = window_size(patch_px, rf, stride)
    return min(w, gh), min(w, gw)


def touched_range(start: jax.Array | int, patch_px: int, rf: int, stride: int, size: int) -> tuple:
    """Half-open range ``[lo, hi)`` of grid indices whose receptive field meets pixels ``[start, start + patch_px)``."""
    lo = -((rf - 1 - start) // stride)  # ceil((start - rf + 1) / stride)
    hi = (start + patch_px - 1) // stride + 1
    lo = jnp.clip(lo, 0, size)
    return lo, jnp.clip(hi, lo, size)  # empty (lo == hi) for pixels no location sees


def patch_origin(window_start: jax.Array | int, patch_px: int, rf: int, stride: int, image_size: int) -> jax.Array:
    """A pixel origin of a patch whose touched locations start at grid index ``window_start`` (clipped to the image)."""
    return jnp.clip(stride * window_start + rf - stride, 0, image_size - patch_px)


# ----------------------------------------------------------------------------------------------- window sums
def window_sums(grid: jax.Array, window: tuple[int, int]) -> jax.Array:
    """Sum over every ``wy x wx`` window of a ``(H', W', ...)`` grid: ``(H' - wy + 1, W' - wx + 1, ...)``.

    Summed directly (``reduce_window``), not by differences of an integral image: evidence is non-negative and an
    attacker can make it huge, and differences of huge prefix sums would cancel catastrophically.
    """
    wy, wx = window
    dims = (wy, wx) + (1,) * (grid.ndim - 2)
    return jax.lax.reduce_window(grid, np.zeros((), grid.dtype), jax.lax.add, dims, (1,) * grid.ndim, "VALID")


def window_masks(grid_shape: tuple[int, int], window: tuple[int, int]) -> jax.Array:
    """Bool ``(ny, nx, H', W')``: location (i, j) lies in the window starting at (a, b)."""
    (gh, gw), (wy, wx) = grid_shape, window
    a = np.arange(gh - wy + 1)[:, None, None, None]
    b = np.arange(gw - wx + 1)[None, :, None, None]
    i = np.arange(gh)[None, None, :, None]
    j = np.arange(gw)[None, None, None, :]
    return jnp.asarray((i >= a) & (i < a + wy) & (j >= b) & (j < b + wx))


def window_overlaps(windows: tuple[int, int], window: tuple[int, int]) -> np.ndarray:
    """Bool ``(ny, nx, ny, nx)``: the window starting at (a, b) shares a location with the one at (a2, b2)."""
    (ny, nx), (wy, wx) = windows, window
    rows = np.abs(np.arange(ny)[:, None] - np.arange(ny)[None, :]) < wy
    cols = np.abs(np.arange(nx)[:, None] - np.arange(nx)[None, :]) < wx
    return rows[:, None, :, None] & cols[None, :, None, :]


def rounding_tolerance(scale: jax.Array, count: int) -> jax.Array:
    """Worst-case float rounding of sums of ``count`` terms of total magnitude ``scale``: ``4 * count * eps * scale``.

    A certificate needs its worst-case margin above it, so it holds for the float computation of the defense, not
    just for exact reals; exact ties never certify.
    """
    return 4.0 * count * jnp.finfo(jnp.float32).eps * scale


# ----------------------------------------------------------------------------------------------- masking
def predicted_class(logits: jax.Array, defense: str) -> jax.Array:
    """The class a defense predicts from its image logits ``(..., C)``, with PatchGuard's tie-breaking.

    Robust masking (``masking_defense``: ``np.argsort(kind='stable')[-1]``) takes the largest index among tied
    classes; Clipped BagNet (``clipping_defense``: ``np.argmax``) and the plain mean the smallest.
    """
    if defense == "mask":
        return logits.shape[-1] - 1 - jnp.argmax(jnp.flip(logits, axis=-1), axis=-1)
    return jnp.argmax(logits, axis=-1)


def clip_evidence(patch_logits: jax.Array, clip_max: float = math.inf) -> jax.Array:
    """PatchGuard's clipping of local logits to ``[0, c_h]`` (``c_h = inf``: negatives only)."""
    return jnp.clip(patch_logits, 0.0, clip_max)


def masked_logits(patch_logits: jax.Array, window: tuple[int, int], *, clip_max: float = math.inf,
                  threshold: float = 0.0) -> jax.Array:
    """Robust masking (PatchGuard Algorithm 1) of one image's ``(H', W', C)`` patch logits: ``(C,)`` class evidence.

    Per class: clipped total ``G``, largest window sum ``M``; when ``M > T * G`` (detection) that window is masked.
    The masked evidence is summed over the locations outside the window (the same as ``G - M`` without its
    cancellation when an attacker's window is huge).
    """
    evidence = clip_evidence(patch_logits, clip_max)
    total = evidence.sum(axis=(0, 1))
    sums = window_sums(evidence, window).reshape(-1, evidence.shape[-1])  # (windows, C)
    largest = sums.max(axis=0)
    masks = window_masks(evidence.shape[:2], window).reshape(-1, *evidence.shape[:2])
    outside = jnp.einsum("hwc,chw->c", evidence, ~masks[jnp.argmax(sums, axis=0)])
    return jnp.where(largest > threshold * total, outside, total)


def masked_window(patch_logits: jax.Array, window: tuple[int, int], cls: jax.Array, *,
                  clip_max: float = math.inf) -> jax.Array:
    """Start ``(a, b)`` of the window robust masking removes for class ``cls`` (the first largest)."""
    sums = window_sums(clip_evidence(patch_logits, clip_max)[..., cls], window)
    return jnp.stack(jnp.unravel_index(jnp.argmax(sums), sums.shape))


def masking_margins(patch_logits: jax.Array, label: jax.Array, window: tuple[int, int], *,
                    clip_max: float = math.inf, threshold: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Provable analysis of robust masking for every window a patch may occupy: ``(safe, margin)``, each ``(ny, nx)``.

    ``safe[a, b]``: no content of window (a, b) changes the prediction from ``label``; ``margin`` is the true
    class's lower bound minus the largest wrong-class upper bound there (negative: possibly attackable). As in
    PatchGuard's ``provable_masking``, nothing is safe when the undefended clipped sum predicts another class.
    """
    if not 0.0 <= threshold < 1.0:
        raise UserError(f"the detection threshold T must lie in [0, 1), got {threshold}")
    evidence = clip_evidence(patch_logits, clip_max)
    num_classes = evidence.shape[-1]
    total = evidence.sum(axis=(0, 1))
    sums = window_sums(evidence, window)  # (ny, nx, C)
    upper = (total - sums) / (1.0 - threshold)  # Lemma 1: a wrong class keeps at most t / (1 - T)
    true_map = evidence[..., label]
    masks = window_masks(true_map.shape, window)  # (ny, nx, H', W')
    near = jnp.asarray(window_overlaps(sums.shape[:2], window))  # (ny, nx, ny, nx)

    def removable(mask: jax.Array, overlapping: jax.Array) -> jax.Array:
        """M0: the most true-class evidence outside window ``mask`` that a detection can mask."""
        zeroed = jnp.where(mask, 0.0, true_map)
        remaining = window_sums(zeroed, window)
        largest = remaining.max()
        return jnp.where(largest > threshold * zeroed.sum(), largest, jnp.max(jnp.where(overlapping, remaining, 0.0)))

    outside = total[label] - sums[..., label]
    lower = outside - jax.vmap(jax.vmap(removable))(masks, near)  # S0 - M0
    others = jnp.arange(num_classes) != label
    margin = lower - jnp.max(jnp.where(others, upper, -jnp.inf), axis=-1)
    tolerance = rounding_tolerance(jnp.max(total) / (1.0 - threshold), true_map.size)
    undefended_correct = predicted_class(total, "mask") == label
    return (margin > tolerance) & undefended_correct, margin


# ----------------------------------------------------------------------------------------------- clipping
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


def clipping_margins(patch_logits: jax.Array, label: jax.Array, window: tuple[int, int],
                     clip: Clip) -> tuple[jax.Array, jax.Array]:
    """Provable analysis of Clipped BagNet for every window: ``(safe, margin)``, each ``(ny, nx)``.

    The worst patch sets ``phi_y = low`` and ``phi_c = high`` in the window, so the summed margin over class c is
    at least ``sum_outside(phi_y - phi_c) - wy * wx * (high - low)``; every class c != label is checked.
    """
    phi = clip.fn(patch_logits)
    diff = jnp.take(phi, label, axis=-1)[..., None] - phi  # (H', W', C)
    outside = diff.sum(axis=(0, 1)) - window_sums(diff, window)  # (ny, nx, C)
    worst = outside - window[0] * window[1] * (clip.high - clip.low)
    others = jnp.arange(phi.shape[-1]) != label
    margin = jnp.min(jnp.where(others, worst, jnp.inf), axis=-1)
    count = phi.shape[0] * phi.shape[1]
    return margin > rounding_tolerance(count * max(abs(clip.low), abs(clip.high)), count), margin


def config_clip(config) -> str:
    """``config.robust.clip`` of a training config: a ``parse_clip`` spec, or ``""`` for the plain mean."""
    section = config.get("robust")
    return str(section.get("clip", "")) if section is not None else ""


def apply_model(model: nn.Module, variables: Any, images: jax.Array, config, **kwargs: Any) -> Any:
    """``model.apply(variables, images, **kwargs)``; with ``config.robust.clip`` the image logits are Clipped
    BagNet's (the mean of the clipped patch logits), which is how a model is trained for the clip defense.
    """
    clip = config_clip(config)
    if not clip:
        return model.apply(variables, images, **kwargs)
    if not hasattr(model, "patch_logits"):
        raise UserError(f"config.robust.clip={clip!r} clips patch logits and needs a BagNet, not {config.model}: "
                        "set config.robust.clip=''")
    phi = parse_clip(clip)
    out = model.apply(variables, images, output="patch_logits", **kwargs)
    if isinstance(out, tuple):  # mutable collections were requested
        return clipped_logits(out[0], phi), out[1]
    return clipped_logits(out, phi)


# ----------------------------------------------------------------------------------------------- defenses
def defended_logits(patch_logits: jax.Array, defense: str, window: tuple[int, int], *,
                    clip: Clip | None = None, clip_max: float = math.inf, threshold: float = 0.0) -> jax.Array:
    """Image logits ``(C,)`` of one image under a defense: ``none`` (mean), ``mask`` (PatchGuard), ``clip`` (CBN)."""
    if defense == "none":
        return patch_logits.mean(axis=(0, 1))
    if defense == "mask":
        return masked_logits(patch_logits, window, clip_max=clip_max, threshold=threshold)
    if defense == "clip":
        return clipped_logits(patch_logits, clip or parse_clip("cbn"))
    raise UserError(f"unknown defense {defense!r}: choose from {', '.join(DEFENSES)}")


def window_margins(patch_logits: jax.Array, label: jax.Array, defense: str, window: tuple[int, int], *,
                   clip: Clip | None = None, clip_max: float = math.inf,
                   threshold: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """``(safe, margin)`` per window for one image; the undefended mean has unbounded logits: nothing is safe."""
    if defense == "mask":
        return masking_margins(patch_logits, label, window, clip_max=clip_max, threshold=threshold)
    if defense == "clip":
        return clipping_margins(patch_logits, label, window, clip or parse_clip("cbn"))
    if defense == "none":
        ny, nx = patch_logits.shape[0] - window[0] + 1, patch_logits.shape[1] - window[1] + 1
        return jnp.zeros((ny, nx), bool), jnp.full((ny, nx), -jnp.inf)
    raise UserError(f"unknown defense {defense!r}: choose from {', '.join(DEFENSES)}")


def certify(patch_logits: jax.Array, labels: jax.Array, defense: str, window: tuple[int, int], **kwargs
            ) -> dict[str, jax.Array]:
    """Batch certification ``(B, H', W', C), (B,)``: clean prediction, per-image ``certified`` and per-window maps.

    An image is certified when every window is safe: then no patch of that size, anywhere, changes its (correct)
    prediction. ``jax.jit`` with ``defense``, ``window`` and the keyword arguments static.
    """
    predict = jax.vmap(lambda p: predicted_class(defended_logits(p, defense, window, **kwargs), defense))
    safe, margin = jax.vmap(lambda p, y: window_margins(p, y, defense, window, **kwargs))(patch_logits, labels)
    return {"prediction": predict(patch_logits), "certified": jnp.all(safe, axis=(1, 2)), "safe": safe,
            "margin": margin}
