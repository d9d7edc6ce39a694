"""Certifying BagNet patch logits against a patch: bagjax (jit + vmap) against a per-image, per-window Python loop.

The baseline is tests/robust_reference.py: PatchGuard's provable analysis (``provable_masking`` in
inspire-group/PatchGuard's utils/defense_utils.py) and Clipped BagNet's bound, one image and one window
position at a time in NumPy, stopping at the first window an attacker could use, with the bounds bagjax
derives. Both certify the same random logits: a BagNet-17 grid of a 224 px image (26 x 26), ImageNette's 10
classes, a 1% patch (23 px, a 5 x 5 window), the true class boosted by a random amount so that some images
certify and some do not. The certified sets must be equal.

    python bench/robust.py [--images 24] [--patch 23] [--classes 10]

The last line is `robust_certify: R.RRx (bagjax over per-window Python loop)` (robust masking, the slower one).
"""
from __future__ import annotations

import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import jax
import jax.numpy as jnp
import numpy as np
import robust_reference

from bagjax import cli, robust
from bagjax.models import create_model
from benchargs import at_least

MODEL, SIZE = "bagnet17", 224


def main() -> None:
    p = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--patch", type=int, default=23, help="patch side in px (23 = 1%% of a 224 px image)")
    p.add_argument("--classes", type=int, default=10)
    args = p.parse_args()
    at_least(p, args, images=1, patch=1, classes=2)
    if args.patch > SIZE:
        p.error(f"--patch must be at most the {SIZE} px image, got {args.patch}")
    model = create_model(MODEL, num_classes=args.classes)
    grid = model.capabilities.grid_shape(SIZE, SIZE)
    window = robust.window_shape(model, args.patch, SIZE, SIZE)
    rng = np.random.default_rng(0)
    labels = rng.integers(args.classes, size=args.images)
    logits = rng.standard_normal((args.images, *grid, args.classes)).astype(np.float32)
    logits[np.arange(args.images), :, :, labels] += rng.uniform(0.0, 0.8, (args.images, 1, 1)).astype(np.float32)
    clip = robust.parse_clip("cbn:1,0")
    print(f"{MODEL} grid {grid[0]}x{grid[1]} of a {SIZE} px image, {args.classes} classes, {args.patch} px patch: "
          f"window {window[0]}x{window[1]}, {args.images} images, jax {jax.devices()[0].platform}")
    ratios = {}
    for defense, kwargs in (("clip", {"clip": clip}), ("mask", {})):
        certify = jax.jit(lambda x, y, d=defense, k=kwargs: robust.certify(x, y, d, window, **k)["certified"])
        x, y = jnp.asarray(logits), jnp.asarray(labels)
        jax.block_until_ready(certify(x, y))  # compile
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            ours = np.asarray(jax.block_until_ready(certify(x, y)))
            best = min(best, time.perf_counter() - start)
        start = time.perf_counter()
        if defense == "mask":
            reference = [robust_reference.masking_certified(l, int(c), window) for l, c in zip(logits, labels)]
        else:
            phi = np.asarray(clip.fn(x))
            reference = [robust_reference.clipping_certified(f, int(c), window, clip.low, clip.high)
                         for f, c in zip(phi, labels)]
        loop = time.perf_counter() - start
        if not np.array_equal(ours, reference):
            raise SystemExit(f"{defense}: bagjax and the loop certify different images: {ours} vs {reference}")
        ratios[defense] = loop / best
        print(f"{defense}: {int(ours.sum())} / {args.images} certified by both; bagjax "
              f"{best / args.images * 1e3:.3f} ms per image, loop {loop / args.images * 1e3:.1f} ms per image: "
              f"{ratios[defense]:.1f}x")
    print(f"robust_certify: {ratios['mask']:.2f}x (bagjax over per-window Python loop)")


if __name__ == "__main__":
    main()
