"""Stride-1 BagNet-33 heatmaps of 224 px images: bagjax against the per-pixel PyTorch reference method.

The reference is bethgelab's `utils.generate_heatmap_pytorch` (Brendel & Bethge 2019, Fig. 2): zero-pad the
normalized image by (rf - 1) // 2, cut the rf x rf patch centred on every pixel (unfold, stride 1) and run
the patches through the model in batches of 1,000, keeping the target logit: 50,176 forward passes of a
33 x 33 patch. Here it runs on tests/torch_reference.py's BagNet-33 (official state_dict names, random
weights, eval mode; on the GPU when torch sees one) on a fixed random subset of `--patches` pixels of the first
image, and its time is scaled to the whole image. bagjax (`bagjax.interpret.stride1_heatmap`, same weights
through bagjax.convert) computes the whole maps of `--images` images in one call (batched: the images share
each polyphase pass, as many as `chunk_pixels` allows); the figure is its time per image. The values on the
subset must match the reference's to 1e-5 on the CPU; on a GPU, where both sides run float32 convolutions in
TF32 by default, to 1e-2 of the largest |logit|.

It also prints the arithmetic (docs/benchmarks.md): the conv multiply-adds of both methods per image
(`bagjax.models.macs` convention; `interpret.stride1_multiply_adds` for bagjax), their rates, and the ceiling of
bagjax's method on this machine: the ratio it would reach if its multiply-adds ran at the rate of a
2048^3 float32 matrix product timed in the same rounds, with nothing else costing time.

    python bench/heatmap.py [--patches 2000] [--rounds 2] [--images 1] [--chunk-pixels N]
    python bench/heatmap.py --patches 10000 --images 16       # on a GPU

The last line is `heatmap_stride1: R.RRx (bagjax over PyTorch per-pixel reference)`.
"""
from __future__ import annotations

import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import jax
import numpy as np
import torch
import torch_reference

from bagjax import cli, convert, interpret
from bagjax.data.preprocess import normalize
from bagjax.models import create_model, macs
from benchargs import at_least

MODEL = "bagnet33"
NUM_CLASSES = 1000
SIZE = 224
TARGET = 7
REFERENCE_BATCH = 1000  # torch.split(patches, 1000) in the reference
TOLERANCE = 1e-5
GEMM = 2048  # the square float32 matrix product that measures this machine's rate ...
GEMM_REPEATS = 10  # ... repeated per round


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
        return torch.cat([model(batch)[:, target] for batch in torch.split(patches, REFERENCE_BATCH)]).cpu().numpy()


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=2000, help="reference pixels timed (scaled to the image)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds, alternating (median)")
    parser.add_argument("--images", type=int, default=1, help="images per bagjax call (batched heatmaps)")
    parser.add_argument("--chunk-pixels", type=int, default=None, help="bagjax output pixels per pass")
    args = parser.parse_args()
    at_least(parser, args, patches=1, rounds=1, images=1, chunk_pixels=1)
    if args.patches > SIZE * SIZE:
        parser.error(f"--patches must be at most the {SIZE * SIZE} pixels of a {SIZE} px image, got {args.patches}")
    device = "cuda" if torch.cuda.is_available() else "cpu"

    reference = torch_reference.build_reference(MODEL, NUM_CLASSES)
    variables = jax.device_put(convert.from_torch_state_dict(MODEL, reference.state_dict()))
    reference = reference.to(device)
    model = create_model(MODEL, num_classes=NUM_CLASSES)
    rf = model.capabilities.receptive_field
    rng = np.random.default_rng(0)
    images = normalize(rng.integers(0, 256, (args.images, SIZE, SIZE, 3), dtype=np.uint8))
    image = images[0]
    flat = np.sort(rng.choice(SIZE * SIZE, size=args.patches, replace=False))
    pixels = np.stack(np.unravel_index(flat, (SIZE, SIZE)), axis=-1)
    patches = reference_patches(image, rf, pixels).to(device)
    images = jax.device_put(images)

    def run_bagjax() -> np.ndarray:
        return np.asarray(interpret.stride1_heatmap(model, variables, images, TARGET, chunk_pixels=args.chunk_pixels))

    def run_reference() -> np.ndarray:
        return reference_logits(reference, patches, TARGET)

    gemm_operand = jax.device_put(rng.standard_normal((GEMM, GEMM), np.float32))
    gemm = jax.jit(lambda a: a @ a)

    def run_gemm() -> None:
        for _ in range(GEMM_REPEATS):
            gemm(gemm_operand).block_until_ready()

    reference_macs = SIZE * SIZE * macs.multiply_adds(model, variables, np.zeros((1, rf, rf, 3), np.float32))
    bagjax_macs = interpret.stride1_multiply_adds(model, variables, SIZE, SIZE, chunk_pixels=args.chunk_pixels)

    start = time.perf_counter()
    heatmap = run_bagjax()[0]
    compile_seconds = time.perf_counter() - start
    reference_values = run_reference()
    max_diff = float(np.max(np.abs(heatmap[pixels[:, 0], pixels[:, 1]] - reference_values)))
    tolerance = TOLERANCE if device == "cpu" else 1e-2 * float(np.max(np.abs(reference_values)))
    run_gemm()
    times: dict[str, list[float]] = {"bagjax": [], "reference": [], "gemm": []}
    for _ in range(args.rounds):
        for name, fn in (("bagjax", run_bagjax), ("reference", run_reference), ("gemm", run_gemm)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    bagjax_s = float(np.median(times["bagjax"])) / args.images
    reference_s = float(np.median(times["reference"])) * (SIZE * SIZE) / args.patches
    gemm_gflops = 2 * GEMM**3 * GEMM_REPEATS / float(np.median(times["gemm"])) / 1e9
    ceiling_s = 2 * bagjax_macs / (gemm_gflops * 1e9)

    print(f"{MODEL} stride-1 heatmap, {SIZE} px ({SIZE * SIZE} pixels), rf {rf}, random weights, eval mode")
    print(f"bagjax ({jax.devices()[0].device_kind}, jax {jax.__version__}): {bagjax_s:.3f} s per image, "
          f"{args.images} image(s) per call (first call with compilation {compile_seconds:.2f} s)")
    where = torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"PyTorch per-pixel reference ({where}): "
          f"{reference_s / (SIZE * SIZE) * args.patches:.2f} s for {args.patches} patches, "
          f"{reference_s:.1f} s per image scaled")
    print(f"conv multiply-adds per image: reference {reference_macs / 1e9:,.0f} G "
          f"({2 * reference_macs / 1e9 / reference_s:.1f} GFLOP/s), bagjax {bagjax_macs / 1e9:,.0f} G "
          f"({2 * bagjax_macs / 1e9 / bagjax_s:.1f} GFLOP/s), "
          f"{reference_macs / bagjax_macs:.2f}x fewer")
    print(f"float32 {GEMM}^3 matrix product here: {gemm_gflops:.1f} GFLOP/s; bagjax's multiply-adds at that rate: "
          f"{ceiling_s:.2f} s per image, a ceiling of {reference_s / ceiling_s:.1f}x for this method")
    print(f"max |heatmap difference| on the {args.patches} reference pixels: {max_diff:.2e}")
    if not max_diff <= tolerance:
        raise SystemExit(f"bagjax and the reference disagree by {max_diff:.2e} > {tolerance:.2e}: "
                         "the maps are not equal")
    print(f"heatmap_stride1: {reference_s / bagjax_s:.2f}x (bagjax over PyTorch per-pixel reference)")


if __name__ == "__main__":
    main()
