"""Real images the tests can build offline: scikit-learn's handwritten digits as an image folder of PNGs."""

from __future__ import annotations

import pathlib
from typing import Iterable

import numpy as np
from PIL import Image

UPSCALE = 5  # 8x8 -> 40x40 px, nearest neighbour
EVAL_FRACTION = 0.2


def _write(root: pathlib.Path, images: np.ndarray, labels: np.ndarray, split: str, indices, upscale: int) -> None:
    for i in indices:
        folder = root / split / str(labels[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (images[i] * (255 / 16)).round().astype(np.uint8)
        Image.fromarray(pixels).resize((8 * upscale, 8 * upscale), Image.NEAREST).save(folder / f"{i}.png")


def write_digits_folder(root: pathlib.Path, upscale: int = UPSCALE) -> pathlib.Path:
    """``root/{train,validation}/<digit>/*.png``: the 1,797 images of ``sklearn.datasets.load_digits``
    (16 gray levels, scaled to 0-255), a stratified 80/20 split with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        n_eval = int(round(len(indices) * EVAL_FRACTION))
        _write(root, digits.images, digits.target, "validation", indices[:n_eval], upscale)
        _write(root, digits.images, digits.target, "train", indices[n_eval:], upscale)
    return root


def digits_split(num_train: int = 1400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, eval) of a seeded random split of the 1,797 digits: 1,400 / 397 by default (issue 22's
    comparison with scikit-learn's classifiers on the same images)."""
    order = np.random.default_rng(seed).permutation(1797)
    return np.sort(order[:num_train]), np.sort(order[num_train:])


def write_split_folder(root: pathlib.Path, train: Iterable[int], evaluate: Iterable[int], upscale: int = 4,
                       classes: Iterable[int] = range(10)) -> pathlib.Path:
    """``root/{train,validation}/<digit>/*.png`` of the given digit indices (32 px by default), only ``classes``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = set(classes)
    for split, indices in (("train", train), ("validation", evaluate)):
        _write(root, digits.images, digits.target, split, [i for i in indices if digits.target[i] in keep], upscale)
    return root


def few_shot_split(classes: Iterable[int], per_class: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices (train, eval) of the digits of ``classes``: ``per_class`` seeded picks of each for training, all the
    others for evaluation (the transfer benchmark's target set)."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    rng = np.random.default_rng(seed)
    train, evaluate = [], []
    for label in classes:
        indices = rng.permutation(np.flatnonzero(target == label))
        train += indices[:per_class].tolist()
        evaluate += indices[per_class:].tolist()
    return sorted(train), sorted(evaluate)
