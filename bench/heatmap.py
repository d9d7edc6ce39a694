"""Stride-1 BagNet-33 heatmap of one 224 px image: bagjax against the per-pixel PyTorch reference method.

The reference is bethgelab's `utils.generate_heatmap_pytorch` (Brendel & Bethge 2019, Fig. 2): zero-pad the
normalized image by (rf - 1) // 2, cut the rf x rf patch centred on every pixel (unfold, stride 1) and run
the patches through the model in batches of 1,000, keeping the target logit: 50,176 forward passes of a
33 x 33 patch. Here it runs on tests/torch_reference.py's BagNet-33 (official state_dict names, random
weights, eval mode) on a fixed random subset of `--patches` pixels, and its time is scaled to the whole
image. bagjax (`bagjax.interpret.stride1_heatmap`, same weights through bagjax.convert) computes the whole
map; its values on the subset must match the reference's to 1e-4.

    python bench/heatmap.py [--patches 2000] [--rounds 2]

The last line is `heatmap_stride1: R.RRx (bagjax over PyTorch per-pixel reference)`.
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import jax
import numpy as np
import torch
import torch_reference

from bagjax import convert, interpret
from bagjax.data.preprocess import normalize
from bagjax.models import create_model

MODEL = "bagnet33"
NUM_CLASSES = 1000
SIZE = 224
TARGET = 7
REFERENCE_BATCH = 1000  # torch.split(patches, 1000) in the reference
TOLERANCE = 1e-4


def reference_patches(image: np.ndarray, rf: int, pixels: np.ndarray) -> torch.Tensor:
    """The reference's patches of the given (y, x) pixels: zero pad by (rf-1)//2, unfold with stride 1."""
    height, width, channels = image.shape
    lo = (rf - 1) // 2
    padded = np.zeros((channels, height + rf - 1, width + rf - 1), np.float32)
    padded[:, lo:lo + height, lo:lo + width] = image.transpose(2, 0, 1)
    windows = torch.from_numpy(padded).unfold(1, rf, 1).unfold(2, rf, 1)  # (C, H, W, rf, rf), a view
    return windows[:, pixels[:, 0], pixels[:, 1]].permute(1, 0, 2, 3).contiguous()  # (N, C, rf, rf)


def reference_logits(model: torch.nn.Module, patches: torch.Tensor, target: int) -> np.ndarray:
    """Target logit of every patch, batches of 1,000 through the model, as generate_heatmap_pytorch does."""
    with torch.no_grad():
        return np.concatenate([model(batch)[:, target].numpy() for batch in torch.split(patches, REFERENCE_BATCH)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=2000, help="reference pixels timed (scaled to the image)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, alternating (median)")
    args = parser.parse_args()

    reference = torch_reference.build_reference(MODEL, NUM_CLASSES)
    variables = jax.device_put(convert.from_torch_state_dict(MODEL, reference.state_dict()))
    model = create_model(MODEL, num_classes=NUM_CLASSES)
    rf = model.receptive_field
    rng = np.random.default_rng(0)
    image = normalize(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    flat = np.sort(rng.choice(SIZE * SIZE, size=args.patches, replace=False))
    pixels = np.stack(np.unravel_index(flat, (SIZE, SIZE)), axis=-1)
    patches = reference_patches(image, rf, pixels)

    def run_bagjax() -> np.ndarray:
        return np.asarray(interpret.stride1_heatmap(model, variables, image, TARGET))

    def run_reference() -> np.ndarray:
        return reference_logits(reference, patches, TARGET)

    start = time.perf_counter()
    heatmap = run_bagjax()
    compile_seconds = time.perf_counter() - start
    max_diff = float(np.max(np.abs(heatmap[pixels[:, 0], pixels[:, 1]] - run_reference())))
    times: dict[str, list[float]] = {"bagjax": [], "reference": []}
    for _ in range(args.rounds):
        for name, fn in (("bagjax", run_bagjax), ("reference", run_reference)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    bagjax_s = float(np.median(times["bagjax"]))
    reference_s = float(np.median(times["reference"])) * (SIZE * SIZE) / args.patches

    print(f"{MODEL} stride-1 heatmap, {SIZE} px ({SIZE * SIZE} pixels), rf {rf}, random weights, eval mode")
    print(f"bagjax ({jax.devices()[0].platform}): {bagjax_s:.2f} s per image "
          f"(first call with compilation {compile_seconds:.2f} s)")
    print(f"PyTorch per-pixel reference ({torch.get_num_threads()} threads): "
          f"{reference_s / (SIZE * SIZE) * args.patches:.2f} s for {args.patches} patches, "
          f"{reference_s:.1f} s per image scaled")
    print(f"max |heatmap difference| on the {args.patches} reference pixels: {max_diff:.2e}")
    if not max_diff <= TOLERANCE:
        raise SystemExit(f"bagjax and the reference disagree by {max_diff:.2e} > {TOLERANCE}: the maps are not equal")
    print(f"heatmap_stride1: {reference_s / bagjax_s:.2f}x (bagjax over PyTorch per-pixel reference)")


if __name__ == "__main__":
    main()
