"""An untargeted adversarial patch (sticker) attack on a BagNet under a robust aggregation, by PGD on the patch pixels.

The attacker replaces a ``p x p`` square of the image at a chosen location with arbitrary valid pixels (RGB in
[0, 1], in the model's normalized space) and maximises the margin ``max_{c != y} z_c - z_y`` of the *defended*
image logits ``z`` (``bagjax.robust.defended_logits``): projected signed-gradient ascent (Madry et al. 2018) with
several uniform random starts, as in PatchGuard's ``PatchAttacker`` and Clipped BagNet's sticker attack. Every
(image, location, start) is one entry of a batch, so all of them run in one jitted program on the device.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bagjax import robust
from bagjax.data import MEAN_RGB, STDDEV_RGB

PIXEL_LOW = (0.0 - np.asarray(MEAN_RGB, np.float32)) / np.asarray(STDDEV_RGB, np.float32)
PIXEL_HIGH = (1.0 - np.asarray(MEAN_RGB, np.float32)) / np.asarray(STDDEV_RGB, np.float32)


def paste(image: jax.Array, patch: jax.Array, origin: jax.Array) -> jax.Array:
    """``image`` ``(H, W, 3)`` with ``patch`` ``(p, p, 3)`` written at pixel ``origin = (y, x)``."""
    return jax.lax.dynamic_update_slice(image, patch.astype(image.dtype), (origin[0], origin[1], 0))


def attack_margin(logits: jax.Array, label: jax.Array) -> jax.Array:
    """``max_{c != y} z_c - z_y``: positive means the prediction is no longer ``y``."""
    others = jnp.where(jnp.arange(logits.shape[-1]) == label, -jnp.inf, logits)
    return jnp.max(others) - logits[label]


@functools.partial(jax.jit, static_argnames=("model", "defense", "window", "patch_px", "steps", "defense_kwargs"))
def pgd_patch(model: nn.Module, variables: Any, images: jax.Array, labels: jax.Array, origins: jax.Array,
              key: jax.Array, *, defense: str, window: tuple[int, int], patch_px: int, steps: int = 40,
              step_size: float = 0.05, defense_kwargs: tuple = ()) -> dict[str, jax.Array]:
    """PGD on a patch for every entry of a batch: images ``(N, H, W, 3)``, labels ``(N,)``, origins ``(N, 2)``.

    ``step_size`` is a fraction of each channel's valid range. Returns ``broken`` (the defended prediction left
    ``labels`` at some step), the strongest ``patch`` found ``(N, p, p, 3)`` and its ``margin``.
    """
    kwargs = dict(defense_kwargs)
    low, high = jnp.asarray(PIXEL_LOW), jnp.asarray(PIXEL_HIGH)
    shape = (images.shape[0], patch_px, patch_px, 3)

    def margins(patch_batch):
        attacked = jax.vmap(paste)(images, patch_batch, origins)
        patch_logits = model.apply(variables, attacked, train=False, method="patch_logits").astype(jnp.float32)
        logits = jax.vmap(lambda p: robust.defended_logits(p, defense, window, **kwargs))(patch_logits)
        margin = jax.vmap(attack_margin)(logits, labels)
        return margin.sum(), (margin, robust.predicted_class(logits, defense) != labels)

    grad_fn = jax.value_and_grad(margins, has_aux=True)

    def keep_best(patch, margin, wrong, best_patch, best, broken):
        better = margin > best
        return (jnp.where(better[:, None, None, None], patch, best_patch), jnp.maximum(best, margin),
                broken | wrong)

    def step(carry, _):
        patch, best_patch, best, broken = carry
        (_, (margin, wrong)), grad = grad_fn(patch)
        best_patch, best, broken = keep_best(patch, margin, wrong, best_patch, best, broken)
        patch = jnp.clip(patch + step_size * (high - low) * jnp.sign(grad), low, high)
        return (patch, best_patch, best, broken), None

    start = low + jax.random.uniform(key, shape) * (high - low)
    init = (start, start, jnp.full((shape[0],), -jnp.inf), jnp.zeros((shape[0],), bool))
    (patch, best_patch, best, broken), _ = jax.lax.scan(step, init, None, length=steps)
    _, (margin, wrong) = margins(patch)
    best_patch, best, broken = keep_best(patch, margin, wrong, best_patch, best, broken)
    return {"broken": best > 0, "patch": best_patch, "margin": best}


def grid_origins(image_size: int, patch_px: int, count: int) -> np.ndarray:
    """About ``count`` patch origins ``(K, 2)`` on an even square grid over the image, corners included."""
    side = max(1, int(round(np.sqrt(count))))
    steps = np.unique(np.round(np.linspace(0, image_size - patch_px, side)).astype(np.int32))
    return np.stack(np.meshgrid(steps, steps, indexing="ij"), axis=-1).reshape(-1, 2)


def danger_origins(margin: jax.Array, count: int, *, patch_px: int, rf: int, stride: int,
                   image_size: int) -> jax.Array:
    """Origins ``(B, K, 2)`` of patches over the ``count`` windows with the lowest certificate margin per image."""
    b, ny, nx = margin.shape
    k = min(count, ny * nx)
    _, flat = jax.lax.top_k(-margin.reshape(b, -1), k)
    a, c = jnp.unravel_index(flat, (ny, nx))
    origin = functools.partial(robust.patch_origin, patch_px=patch_px, rf=rf, stride=stride, image_size=image_size)
    return jnp.stack([origin(a), origin(c)], axis=-1).astype(jnp.int32)
