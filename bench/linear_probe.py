"""Head-only fine-tuning of BagNet-33 at 224 px: cached features against the whole network at every step.

A BagNet-33 (full size, random weights with BatchNorm statistics of the train images, written as a
``bagjax.convert`` output) is fine-tuned head-only with the folder recipe
(``configs/folder.py:FOLDER,init_from=WEIGHTS,head_only``) on ``--images`` digits upscaled to 224 px PNGs, for
``--epochs`` epochs, without augmentation (whole images, no flips), twice: with the recipe's ``cache_features=True``
(one forward pass per image, then the head alone) and with ``cache_features=False`` (the frozen network runs
forward on every batch, then the head's gradient). Both train the same head: the largest difference of the final
head parameters is printed.

    python bench/linear_probe.py --images 512 --epochs 10

The last line is `linear_probe: R.RRx (cached over uncached)`: the uncached run's wall time over the cached
run's (start-up and compilation included in both).
"""
from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests"), str(REPO_ROOT / "bench")]

import numpy as np

import baselines
import benchargs
import digits
from bagjax import cli

SIZE = 224
STATISTICS_IMAGES = 32  # train images whose BatchNorm statistics the random weights get


def write_weights(path: pathlib.Path, folder: pathlib.Path) -> None:
    """Random BagNet-33 weights whose BatchNorm statistics are those of a batch of the bench's train images.

    With the initial statistics (mean 0, variance 1) every eval-mode residual block adds an unnormalised branch,
    the random network's features grow to the hundreds and the head's optimisation is unstable, so the final
    heads of two runs differ by more than rounding. Statistics of the images themselves (one train-mode forward
    with momentum 0: ``bagjax.training.precise_bn.batch_moments``) keep every layer near unit variance.
    """
    import jax
    import jax.numpy as jnp

    from bagjax import convert
    from bagjax.data.preprocess import load_image_file
    from bagjax.models import create_model
    from bagjax.training import precise_bn

    model = create_model("bagnet33", num_classes=1000)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, SIZE, SIZE, 3)), train=False))(jax.random.key(0))
    files = sorted((folder / "train").glob("*/*.png"))[::16][:STATISTICS_IMAGES]
    batch = {"image": np.stack([load_image_file(str(f)) for f in files])}
    moments = jax.jit(lambda v, b: precise_bn.batch_moments(v, b, model=model))
    variables = {"params": variables["params"], "batch_stats": moments(variables, batch)}
    convert.write_pretrained(path, jax.tree.map(np.asarray, variables), model="bagnet33", num_classes=1000,
                             source="random weights, BatchNorm statistics of the bench's images")


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="train images (digits at 224 px)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-images", type=int, default=100)
    args = parser.parse_args()
    benchargs.at_least(parser, args, images=10, epochs=1, batch=1, eval_images=1)
    if args.images + args.eval_images > 1797:
        parser.error(f"--images plus --eval-images must be at most the 1,797 digits, got "
                     f"{args.images + args.eval_images}")
    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_linear_probe_"))
    try:
        train, evaluate = digits.digits_split(args.images)
        folder = digits.write_split_folder(root / "digits", train, evaluate[:args.eval_images], upscale=SIZE // 8)
        write_weights(root / "bagnet33", folder)
        common = (f"--config.batch_size={args.batch}", f"--config.num_epochs={args.epochs}",
                  "--config.data.crop_min_area=1.0", "--config.data.crop_aspect_ratio=(1.0,1.0)",
                  "--config.data.flip=False", "--config.data.crop_fraction=1.0",
                  f"--config.eval_batch_size={min(args.eval_images, 50)}", "--config.precise_bn.guard_batches=1")
        arg = f"folder.py:{folder},init_from={root / 'bagnet33'},head_only"
        cached = baselines.train(arg, root / "cached", *common)
        uncached = baselines.train(arg, root / "uncached", *common, "--config.cache_features=False")
        from bagjax.training.checkpoints import read_variables

        heads = [read_variables(root / name)["params"]["head"] for name in ("cached", "uncached")]
        diff = max(float(np.max(np.abs(heads[0][k] - heads[1][k]))) for k in heads[0])
        scale = max(float(np.max(np.abs(heads[1][k]))) for k in heads[1])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(cached["recipe"])
    print("| head-only BagNet-33, 224 px | wall time | eval accuracy |\n|---|---|---|")
    for name, r in (("cached features", cached), ("uncached (whole network every step)", uncached)):
        print(f"| {name} | {r['seconds']:.0f} s | {r['eval_accuracy']:.2%} |")
    print(f"{args.images} images, {args.epochs} epochs; largest difference of the final head parameters: {diff:.2e} "
          f"(the largest parameter: {scale:.2e})")
    print(f"linear_probe: {uncached['seconds'] / cached['seconds']:.2f}x (cached over uncached)")


if __name__ == "__main__":
    cli.run_main(main)
