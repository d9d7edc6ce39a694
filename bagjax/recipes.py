"""Recipes: a training config read off a folder of images, from scratch or from pretrained weights.

``configs/folder.py:ARG`` calls :func:`folder_config`; ``ARG`` is ``PATH[,init_from=DIR[,head_only]][,budget=F]``:

- ``PATH`` alone: a BagNet from scratch (:func:`from_scratch`), sized from the folder;
- ``init_from=DIR``: full fine-tuning of the weights in ``DIR`` (a ``python -m bagjax.convert`` output or a
  training workdir), whose architecture and preprocessing the recipe adopts (:func:`fine_tune`);
- ``head_only``: only the head trains, on features of the frozen backbone computed once and cached
  (``freeze_backbone=True``, ``cache_features=True``: ``bagjax.training.features``);
- ``budget=F``: F times the recipe's training compute (default 1; :func:`epochs_and_batch`).

The weights go in the config argument, not in ``--config.init_from``: the recipe chooses the model from them
before any ``--config.`` override applies (a lone ``--config.init_from`` with this config is refused in one line).
Every recipe prints one line saying what it chose; every choice can still be overridden with ``--config.KEY=VALUE``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import statistics

import ml_collections
from PIL import Image

from bagjax.data.sources import IMAGE_EXTENSIONS
from bagjax.errors import UserError

EVAL_SPLITS = ("validation", "val", "test")
SIZE_SAMPLE = 256  # images whose size is read (headers only) for the typical size
MIN_GRID = 3  # patches a side: bag-of-features needs a bag
PATCH_FRACTION = (1 / 3, 0.6)  # the receptive field over the image side the from-scratch recipe aims for
SMALL_IMAGE = 64  # px: below this, whole images (no random resized crops)
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L")
BAGNETS = ("bagnet33", "bagnet17", "bagnet9")  # largest receptive field first
OFFICIAL_SIZE = 224  # the official BagNets' and torchvision's input size


@dataclasses.dataclass(frozen=True)
class Folder:
    """What :func:`scan` reads off an image folder."""

    root: str
    classes: tuple[str, ...]
    num_train: int
    eval_split: str | None
    typical_size: int
    grayscale: bool


def _dirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir())


def _images(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))


def scan(root: str) -> Folder:
    """Classes, eval split, train set size and the typical (median shorter-side) image size of a folder."""
    root = os.path.abspath(os.path.expanduser(root))
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        raise UserError(f"{root} has no train/ directory: lay the images out as {root}/train/<label>/*.jpg "
                        f"(and {root}/validation/<label>/*.jpg for evaluation)")
    classes = _dirs(train)
    files = [f for c in classes for f in _images(os.path.join(train, c))]
    if len(classes) < 2 or not files:
        raise UserError(f"{train} needs a directory of .jpg/.png images per class (found {len(classes)} class "
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
        raise UserError(f"none of the {len(sample)} images sampled in {train} can be read: check the files")
    eval_split = next((s for s in EVAL_SPLITS if os.path.isdir(os.path.join(root, s))), None)
    return Folder(root, tuple(classes), len(files), eval_split, int(statistics.median(sides)), all(gray))


@dataclasses.dataclass(frozen=True)
class Request:
    """What ``configs/folder.py:ARG`` asks for (:func:`parse_arg`)."""

    path: str
    init_from: str = ""
    head_only: bool = False
    budget: float = 1.0


def parse_arg(arg: str) -> Request:
    """``PATH[,init_from=DIR][,head_only][,budget=F]`` -> :class:`Request`."""
    path, *options = arg.split(",")
    init_from, head_only, budget = "", False, 1.0
    usage = "configs/folder.py:PATH[,init_from=DIR[,head_only]][,budget=F]"
    for option in options:
        key, _, value = option.partition("=")
        if key == "init_from" and value:
            init_from = value
        elif option == "head_only":
            head_only = True
        elif key == "budget" and value:
            try:
                budget = float(value)
            except ValueError:
                budget = -1.0
            if not 0 < budget < math.inf:
                raise UserError(f"configs/folder.py: budget={value} is not a positive number: give the share of the "
                                f"recipe's compute, e.g. {path},budget=0.5")
        else:
            raise UserError(f"configs/folder.py: unknown option {option!r} in {arg!r}: use {usage}")
    if head_only and not init_from:
        raise UserError("configs/folder.py: head_only needs pretrained weights: "
                        "configs/folder.py:PATH,init_from=DIR,head_only")
    return Request(path, init_from, head_only, budget)


# ----------------------------------------------------------------------------------------------- the data
def _data(config: ml_collections.ConfigDict, found: Folder) -> int:
    """The dataset, splits and eval batch of a folder; returns the number of train images."""
    n = found.num_train
    if found.eval_split:
        config.data.train_split, config.data.eval_split = "train", found.eval_split
    else:
        config.data.train_split, config.data.eval_split = "train[:80%]", "train[80%:]"
        n = int(n * 0.8)
    config.dataset = f"imagefolder:{found.root}"
    config.num_classes = -1  # the label directories
    config.data.flip = not found.grayscale
    config.eval_batch_size = 250
    return n


def _schedule(config: ml_collections.ConfigDict, n: int) -> int:
    """Evaluation, checkpoint and log intervals and precise-BN batches for ``n`` train images; returns the steps."""
    steps = max(n // config.batch_size, 1) * int(config.num_epochs)
    config.eval_every_steps = max(steps // 5, 1)
    config.checkpoint_every_steps = config.eval_every_steps
    config.log_every_steps = max(min(50, steps // 20), 1)
    config.precise_bn.num_batches = min(32, max(n // config.batch_size, 1))  # at most one epoch of images
    return steps


def batch_size(n: int) -> int:
    """A power of two near 1/20 of the train set, 16 to 256."""
    return min(max(2 ** int(math.log2(max(n / 20, 1))), 16), 256)


def epochs(n: int, budget: float = 1.0) -> int:
    """From-scratch epochs for ``n`` train images: 20 for 1,500, more for smaller sets and fewer for larger ones
    (``20 * sqrt(1500 / n)``, 5 to 30), times the compute ``budget`` (at least one)."""
    return max(round(min(max(round(20 * math.sqrt(1500 / n)), 5), 30) * budget), 1)


def size_and_model(typical: int, stages: tuple[int, ...]) -> tuple[int, str]:
    """(image size, BagNet) with a grid of at least 3x3 and a patch of a third to 0.6 of the image.

    The smallest size from the typical one up (multiples of 8, at most 224) at which some BagNet's receptive
    field covers ``PATCH_FRACTION`` of the image with ``MIN_GRID`` patches a side; the largest receptive field
    wins at that size. Images large enough that even BagNet-33's patch is below a third keep their size and get
    the BagNet with the largest receptive field that gives the grid.
    """
    from bagjax.models import bagnet

    def fits(size: int, name: str) -> bool:
        return bagnet.grid_size(size, bagnet.KERNEL3[name], stages) >= MIN_GRID

    native = min(max(typical // 8 * 8, 8), OFFICIAL_SIZE)
    low, high = PATCH_FRACTION
    for size in range(native, OFFICIAL_SIZE + 1, 8):
        for name in BAGNETS:
            rf = bagnet.receptive_field(bagnet.KERNEL3[name], stages)[0]
            if fits(size, name) and low <= rf / size <= high:
                return size, name
    name = next((m for m in BAGNETS if fits(native, m)), None)
    if name is None:  # too small for a 3x3 bag even at 224: cannot happen for stride-8 BagNets
        raise UserError(f"images of {typical} px give no BagNet a {MIN_GRID}x{MIN_GRID} grid: use larger images")
    return native, name


def from_scratch(config: ml_collections.ConfigDict, found: Folder, budget: float = 1.0) -> str:
    """Fill ``config`` with the from-scratch recipe for the scanned folder; returns the recipe line."""
    from bagjax.models import bagnet

    n = _data(config, found)
    if n < 10_000:
        width, stages = 32, (1, 1, 1, 1)
    elif n < 100_000:
        width, stages = 32, (2, 2, 2, 2)
    else:
        width, stages = 64, (3, 4, 6, 3)
    config.image_size, config.model = size_and_model(found.typical_size, stages)
    rf = bagnet.receptive_field(bagnet.KERNEL3[config.model], stages)[0]
    config.model_kwargs.width, config.model_kwargs.stage_sizes = width, stages
    if config.image_size < SMALL_IMAGE:
        # Whole images: a resized crop of a small image rescales and shifts its object by many pixels (CIFAR
        # recipes translate by a few pixels instead). On the digits at 10 epochs: crops keeping >= 64 % of the area
        # 97.48 %, >= 85 % 98.74 %, whole images 99.50 % (docs/own_images.md).
        config.data.crop_min_area, config.data.crop_aspect_ratio, config.data.crop_fraction = 1.0, (1.0, 1.0), 1.0
    config.batch_size = batch_size(n)
    config.num_epochs = float(epochs(n, budget))
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 3e-3
    config.optimizer.weight_decay = 0.05
    config.label_smoothing = 0.1
    config.schedule.name = "cosine"
    config.schedule.warmup_epochs = 1.0
    steps = _schedule(config, n)
    upscaled = f" (upscaled from {found.typical_size} px)" if config.image_size > found.typical_size else ""
    crops = f"crops keep >= {config.data.crop_min_area:.0%}" if config.data.crop_min_area < 1 else "whole images"
    return (f"folder recipe for {found.root}: {len(found.classes)} classes, {n} train images "
            f"(eval: {config.data.eval_split}), typical size {found.typical_size} px -> {config.model} "
            f"(receptive field {rf} px = {rf / config.image_size:.0%} of the side, width {width}, blocks {stages}) "
            f"at {config.image_size} px{upscaled}, {crops}{'' if config.data.flip else ', no flips (grayscale)'}, "
            f"batch {config.batch_size}, {config.num_epochs:.0f} epochs ({steps} steps), precise BN over "
            f"{config.precise_bn.num_batches} batches")


# ----------------------------------------------------------------------------------------------- fine-tuning
def pretrained_source(init_from: str) -> dict:
    """What a fine-tuning recipe adopts from ``init_from``: model, head, model_kwargs, dtype, image_size, the
    preprocessing keys and the class names (None for converted weights, which carry only a class count)."""
    from bagjax.convert import check_pretrained
    from bagjax.training import checkpoints

    path = pathlib.Path(init_from).expanduser().absolute()
    if not path.exists():
        raise UserError(f"init_from {path} does not exist: give a python -m bagjax.convert output or a training "
                        "workdir")
    if checkpoints.is_workdir(path):
        source = checkpoints.read_config(path)
        names = checkpoints.read_dataset_info(path)["class_names"]
        return {"path": str(path), "kind": "training workdir", "model": source.model, "head": source.head,
                "model_kwargs": dict(source.model_kwargs), "dtype": source.dtype, "image_size": source.image_size,
                "crop_min_area": source.data.crop_min_area, "crop_fraction": source.data.crop_fraction,
                "crop_aspect_ratio": tuple(source.data.crop_aspect_ratio), "class_names": tuple(names),
                "num_classes": len(names)}
    import json

    meta = json.loads((check_pretrained(path) / "model.json").read_text())
    # The official networks: full-size, 224 px, torchvision's ImageNet transform (the defaults of configs/default.py).
    return {"path": str(path), "kind": f"converted {meta['model']}", "model": meta["model"],
            "head": meta.get("head", "learned"), "model_kwargs": {"width": 64, "stage_sizes": (3, 4, 6, 3)},
            "dtype": "float32", "image_size": OFFICIAL_SIZE, "crop_min_area": 0.08, "crop_fraction": 0.875,
            "crop_aspect_ratio": (3 / 4, 4 / 3), "class_names": None, "num_classes": int(meta["num_classes"])}


def fine_tune(config: ml_collections.ConfigDict, found: Folder, init_from: str, head_only: bool,
              budget: float = 1.0) -> str:
    """Fill ``config`` to fine-tune ``init_from`` on the folder (all layers, or the head on cached features).

    Adopted from the weights: the architecture (model, head, width, blocks, dtype) and the preprocessing (input
    size, crop area and aspect ratio, eval crop fraction). The head is re-initialised when the folder's classes
    differ from the source's in number or names (``reinit_head``).

    Schedules. Full fine-tuning: the from-scratch recipe's AdamW (weight decay 0.05, label smoothing 0.1, one
    epoch of warmup, cosine) at a third of its learning rate (1e-3) for as many epochs. The fixed-classifier
    thesis's transfer setting (Table 4.3: SGD, momentum 0.9, learning rate 0.01 at batch 64, weight decay 1e-4)
    was measured first on 20 digits a class and stayed below training from scratch (79 % against 89 % after 15
    epochs: a new head learns too slowly at that rate in a hundred steps); AdamW at 1e-3 was at 89 % after 3 epochs
    (docs/own_images.md). The head alone (a linear probe,
    the blackout paper's setting) trains on cached, unaugmented features, so epochs cost little: SGD with
    momentum 0.9 and learning rate 0.1 at batch 256 scaled linearly, no weight decay, 50 epochs, the
    linear-probe protocol of SimCLR/MoCo v3 (Chen et al.), shortened for small sets.
    """
    source = pretrained_source(init_from)
    n = _data(config, found)
    config.init_from = source["path"]
    config.model, config.head, config.dtype = source["model"], source["head"], source["dtype"]
    config.model_kwargs.update(source["model_kwargs"])
    config.image_size = source["image_size"]
    config.data.crop_min_area, config.data.crop_fraction = source["crop_min_area"], source["crop_fraction"]
    config.data.crop_aspect_ratio = source["crop_aspect_ratio"]
    same_classes = (source["class_names"] == found.classes if source["class_names"] is not None
                    else source["num_classes"] == len(found.classes))
    config.reinit_head = not same_classes
    config.batch_size = min(batch_size(n), 64)
    config.schedule.name = "cosine"
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.9
    if head_only:
        config.freeze_backbone = config.cache_features = True
        config.optimizer.learning_rate = 0.1 * config.batch_size / 256
        config.optimizer.weight_decay = 0.0
        config.schedule.warmup_epochs = 0.0
        config.label_smoothing = 0.0
        config.num_epochs = float(max(round(50 * budget), 1))
    else:
        config.optimizer.name = "adamw"
        config.optimizer.learning_rate = 1e-3
        config.optimizer.weight_decay = 0.05
        config.schedule.warmup_epochs = 1.0
        config.label_smoothing = 0.1
        config.num_epochs = float(epochs(n, budget))
    steps = _schedule(config, n)
    if head_only:
        config.eval_every_steps = config.checkpoint_every_steps = steps  # evaluating cached features is cheap,
        # but one evaluation at the end keeps the log short
    head = ("new head: " + (f"{len(found.classes)} classes, not the source's {source['num_classes']}"
                            if source["num_classes"] != len(found.classes) else "other class names")
            if config.reinit_head else "head kept: the same classes")
    mode = ("head only, on cached features of the frozen backbone" if head_only else "every layer")
    return (f"folder recipe for {found.root}: {len(found.classes)} classes, {n} train images "
            f"(eval: {config.data.eval_split}) -> fine-tune {mode} of {source['kind']} {source['path']}: "
            f"{config.model} ({config.head} head) at {config.image_size} px, crops keep >= "
            f"{config.data.crop_min_area:.0%}, eval crop {config.data.crop_fraction:g}; {head}; "
            f"{config.optimizer.name} lr {config.optimizer.learning_rate:g}, batch {config.batch_size}, "
            f"{config.num_epochs:.0f} epochs ({steps} steps)")


def folder_config(config: ml_collections.ConfigDict, arg: str) -> ml_collections.ConfigDict:
    """``configs/folder.py:ARG``: fill ``config`` (configs/default.py's) for the folder, print the recipe line."""
    request = parse_arg(arg)
    found = scan(request.path)
    line = (fine_tune(config, found, request.init_from, request.head_only, request.budget) if request.init_from
            else from_scratch(config, found, request.budget))
    if request.budget != 1:
        line += f" (budget {request.budget:g}: {request.budget:g}x the recipe's epochs)"
    config.recipe_init_from = config.init_from  # what the recipe was chosen for (training.checks compares)
    print(f"{line}; change any with --config.KEY=VALUE", flush=True)
    return config
