"""Your own images: a BagNet trained from scratch on an image folder, with a recipe chosen from the data.

    python train.py --config configs/folder.py:/data/birds --workdir runs/birds

The folder holds ``train/<label>/*.jpg|png`` and an eval split ``validation/``, ``val/`` or ``test/`` with the
same label directories (without one, about 20% of ``train`` is held out by a stable hash of each file's path, so
adding files never moves one between the two: docs/data.md). The config looks at the folder
once and prints what it chose:

- classes: the label directories of ``train``;
- image size: the median shorter side of (up to 256 of) the train images, a multiple of 8, at most 224;
- model: the BagNet with the largest receptive field that still gives a grid of at least 3x3 patches at that
  size (bag-of-features needs a bag); images too small for even BagNet-9's 3x3 grid are upscaled until it fits;
- model size: narrow and shallow for small sets (< 10,000 images: width 16, one block a stage; < 100,000:
  width 32, two blocks), the paper's BagNet above;
- augmentation: small images (< 64 px) get CIFAR-like crops that keep at least 64% of the area (80% of the side)
  and are evaluated uncropped (a 0.08 crop of a 32 px image is a few pixels); larger ones use the ImageNet
  recipe. Grayscale sets (every sampled image in a gray mode) are taken for symbols or handwriting, whose mirror
  image is another symbol, and are not flipped;
- batch size: a power of two near 1/20 of the train set, 16 to 256; epochs: 20 for 1,500 images, more for
  smaller sets and fewer for larger ones (``20 * sqrt(1500 / n)``, 5 to 30; on the digits 14 epochs gave
  95.3-96.1% over seeds 0-2, 20 epochs 96.1-96.7%); AdamW (weight decay 0.05) with cosine decay and label
  smoothing 0.1, as from-scratch training on a small set overfits; evaluated 5 times.

Every choice can be overridden (``--config.num_epochs=50``, ``--config.data.flip=False`` for images whose
mirror image means something else). ``configs/folder.py:smoke`` runs two steps on tiny synthetic data.
"""

from __future__ import annotations

import math
import os
import statistics

from PIL import Image

from bagjax.data.sources import IMAGE_EXTENSIONS
from configs import default

EVAL_SPLITS = ("validation", "val", "test")
SIZE_SAMPLE = 256  # images whose size is read (headers only) for the typical size
MIN_GRID = 3  # patches a side
SMALL_IMAGE = 64  # px: below this, gentler crops
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L")


def _dirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def _images(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))


def scan(root: str) -> dict:
    """Classes, split names, train set size and the typical (median shorter-side) image size of a folder."""
    root = os.path.abspath(os.path.expanduser(root))
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        raise ValueError(f"{root} has no train/ directory: lay the images out as {root}/train/<label>/*.jpg "
                         f"(and {root}/validation/<label>/*.jpg for evaluation)")
    classes = _dirs(train)
    files = [f for c in classes for f in _images(os.path.join(train, c))]
    if len(classes) < 2 or not files:
        raise ValueError(f"{train} needs a directory of .jpg/.png images per class (found {len(classes)} class "
                         f"directories, {len(files)} images)")
    sample = files[:: max(len(files) // SIZE_SAMPLE, 1)][:SIZE_SAMPLE]
    sides, gray = [], []
    for f in sample:
        try:
            with Image.open(f) as image:
                sides.append(min(image.size))
                gray.append(image.mode in GRAY_MODES)
        except OSError:  # unreadable files are skipped (and reported) by the input pipeline
            continue
    if not sides:
        raise ValueError(f"none of the {len(sample)} images sampled in {train} can be read: check the files")
    eval_split = next((s for s in EVAL_SPLITS if os.path.isdir(os.path.join(root, s))), None)
    return {"root": root, "classes": classes, "num_train": len(files), "eval_split": eval_split,
            "typical_size": int(statistics.median(sides)), "grayscale": all(gray)}


def recipe(config, found: dict):
    """Fill ``config`` with the recipe for the scanned folder (see the module docstring)."""
    from bagjax.models import bagnet

    n = found["num_train"]
    size = min(max(found["typical_size"] // 8 * 8, 8), 224)
    if found["eval_split"]:
        config.data.train_split, config.data.eval_split = "train", found["eval_split"]
    else:
        config.data.train_split, config.data.eval_split = "train[:80%]", "train[80%:]"
        n = int(n * 0.8)
    if n < 10_000:
        width, stages = 16, (1, 1, 1, 1)
    elif n < 100_000:
        width, stages = 32, (2, 2, 2, 2)
    else:
        width, stages = 64, (3, 4, 6, 3)
    fits = [m for m in ("bagnet33", "bagnet17", "bagnet9")
            if bagnet.grid_size(size, bagnet.KERNEL3[m], stages) >= MIN_GRID]
    config.model = fits[0] if fits else "bagnet9"
    rf = bagnet.receptive_field(bagnet.KERNEL3[config.model], stages)[0]
    upscaled = ""
    if not fits:  # too small for any bag of 3x3 patches: upscale to the smallest size that gives one
        size = next(s for s in range(size, 225, 8)
                    if bagnet.grid_size(s, bagnet.KERNEL3["bagnet9"], stages) >= MIN_GRID)
        upscaled = f" (upscaled: bagnet9 needs {size} px for {MIN_GRID}x{MIN_GRID} patches)"
    config.image_size = size
    config.model_kwargs.width, config.model_kwargs.stage_sizes = width, stages
    config.dataset = f"imagefolder:{found['root']}"
    config.num_classes = -1  # the label directories
    if config.image_size < SMALL_IMAGE:
        config.data.crop_min_area, config.data.crop_fraction = 0.64, 1.0
    config.data.flip = not found["grayscale"]
    config.batch_size = min(max(2 ** int(math.log2(max(n / 20, 1))), 16), 256)
    config.eval_batch_size = 250
    config.num_epochs = float(min(max(round(20 * math.sqrt(1500 / n)), 5), 30))
    steps = max(n // config.batch_size, 1) * int(config.num_epochs)
    config.eval_every_steps = max(steps // 5, 1)
    config.checkpoint_every_steps = config.eval_every_steps
    config.log_every_steps = max(min(50, steps // 20), 1)
    config.precise_bn.num_batches = min(32, max(n // config.batch_size, 1))  # at most one epoch of images
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.weight_decay = 0.05
    config.label_smoothing = 0.1
    config.schedule.name = "cosine"
    config.schedule.warmup_epochs = 1.0
    print(f"folder recipe for {found['root']}: {len(found['classes'])} classes, {n} train images "
          f"(eval: {config.data.eval_split}), typical size {found['typical_size']} px -> {config.model} "
          f"(receptive field {rf} px, width {width}, blocks {stages}) at {config.image_size} px{upscaled}, "
          f"crops keep >= "
          f"{config.data.crop_min_area:.0%}{'' if config.data.flip else ', no flips (grayscale)'}, "
          f"batch {config.batch_size}, {config.num_epochs:.0f} epochs ({steps} steps), precise BN over "
          f"{config.precise_bn.num_batches} batches; change any with --config.KEY=VALUE", flush=True)
    return config


def get_config(arg: str | None = None):
    config = default.get_config()
    if arg == "smoke":
        config.model = "bagnet17"
        return default.with_arg(config, arg)
    if not arg:
        raise ValueError("configs/folder.py needs the image folder: --config configs/folder.py:/path/to/images "
                         "(with train/<label>/*.jpg inside)")
    return recipe(config, scan(arg))
