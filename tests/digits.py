"""Real images the tests can build offline: scikit-learn's handwritten digits as an image folder of PNGs."""

import pathlib

import numpy as np
from PIL import Image

UPSCALE = 5  # 8x8 -> 40x40 px, nearest neighbour
EVAL_FRACTION = 0.2


def write_digits_folder(root: pathlib.Path) -> pathlib.Path:
    """``root/{train,validation}/<digit>/*.png``: the 1,797 images of ``sklearn.datasets.load_digits``
    (16 gray levels, scaled to 0-255), a stratified 80/20 split with a fixed seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    for label in range(10):
        indices = rng.permutation(np.flatnonzero(digits.target == label))
        n_eval = int(round(len(indices) * EVAL_FRACTION))
        for split, chosen in (("validation", indices[:n_eval]), ("train", indices[n_eval:])):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in chosen:
                pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
                image = Image.fromarray(pixels).resize((8 * UPSCALE, 8 * UPSCALE), Image.NEAREST)
                image.save(folder / f"{i}.png")
    return root
