"""The embedded demo dataset: local motifs on cluttered backgrounds (pure numpy).

BagNets classify by averaging the class evidence of small patches (BagNet
paper, Sec. 3 / Fig. 1). This set is built so that evidence is strictly local:
each class is a small binary motif (11-15 px: stripes, checkerboard, ring,
cross, ...) drawn 1-3 times at random positions in a random colour on a
background of noise plus distractor blobs drawn from a class-independent pool.
Colours come from the same distribution for every class and for the blobs, so
global colour statistics carry no label information; only the local shape does.
A BagNet with a 9-17 px receptive field can learn it, and its heatmaps light
up at the recorded motif boxes.

Examples are generated deterministically from np.random.default_rng((dataset
seed, split, index)) and cached in memory; no TensorFlow is imported.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from bagjax.errors import UserError

import numpy as np

_DATASET_SEED = 1904_00760  # The BagNet arXiv id; fixes the dataset, not the run.
_SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 2}
_MIN_CONTRAST = 120.0

MotifFn = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


def _hstripes(y, x, k):
    del x, k
    return (y // 2) % 2 == 0


def _vstripes(y, x, k):
    del y, k
    return (x // 2) % 2 == 0


def _diagonal(y, x, k):
    del k
    return ((y + x) // 2) % 2 == 0


def _checker(y, x, k):
    del k
    return ((y // 3) + (x // 3)) % 2 == 0


def _ring(y, x, k):
    c = (k - 1) / 2.0
    r = np.hypot(y - c, x - c)
    return (r >= 0.28 * k) & (r <= 0.5 * k)


def _cross(y, x, k):
    c = (k - 1) / 2.0
    half = k / 7.0
    return (np.abs(y - c) <= half) | (np.abs(x - c) <= half)


def _xcross(y, x, k):
    return (np.abs(y - x) <= 1.0) | (np.abs(y + x - (k - 1)) <= 1.0)


def _dots(y, x, k):
    del k
    return (y % 4 < 2) & (x % 4 < 2)


def _frame(y, x, k):
    return (y < 2) | (x < 2) | (y >= k - 2) | (x >= k - 2)


def _triangle(y, x, k):
    c = (k - 1) / 2.0
    return np.abs(x - c) <= (y + 1) / 2.0


MOTIFS: dict[str, MotifFn] = {
    'hstripes': _hstripes,
    'vstripes': _vstripes,
    'diagonal': _diagonal,
    'checker': _checker,
    'ring': _ring,
    'cross': _cross,
    'xcross': _xcross,
    'dots': _dots,
    'frame': _frame,
    'triangle': _triangle,
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One synthetic dataset; None sizes are taken from config.data.synthetic_*."""

    class_names: tuple[str, ...]
    train_size: int | None = None
    eval_size: int | None = None
    image_size: int | None = None
    motif_sizes: tuple[int, int] = (11, 15)
    max_motifs: int = 3
    min_motifs: int = 1


VARIANTS: dict[str, Variant] = {
    'default': Variant(class_names=tuple(MOTIFS)),
    # A smoke-test set: 4 classes, 32 px, 48 train / 16 eval examples.
    'tiny': Variant(
        class_names=('hstripes', 'ring', 'cross', 'checker'),
        train_size=48,
        eval_size=16,
        image_size=32,
        max_motifs=2,
    ),
    # The class motif 6-9 times over a 64 px image: evidence spread over the logit grid, so masking the window of
    # one adversarial patch leaves most of it (the patch-robustness demo, configs/robust_demo.py).
    'crowded': Variant(class_names=tuple(MOTIFS), image_size=64, min_motifs=6, max_motifs=9),
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise UserError(
            f"unknown synthetic variant '{name}': choose one of {sorted(VARIANTS)}"
        )
    return VARIANTS[name]


@dataclasses.dataclass(frozen=True)
class SyntheticSplit:
    """Images (N,H,W,3) uint8, labels (N,) int32, boxes: per image (y0,x0,y1,x1) rows."""

    images: np.ndarray
    labels: np.ndarray
    boxes: tuple[np.ndarray, ...]


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A saturated colour (HSV with random hue); the same law for motifs and blobs."""
    h = rng.uniform(0, 6)
    s = rng.uniform(0.6, 1.0)
    v = rng.uniform(0.55, 1.0)
    c = v * s
    x = c * (1 - abs(h % 2 - 1))
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][int(h) % 6]
    return (np.asarray(rgb) + (v - c)) * 255.0


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A _random_colour at least _MIN_CONTRAST (RGB distance) from the mean colour under a motif."""
    for _ in range(20):
        colour = _random_colour(rng)
        if np.linalg.norm(colour - under) >= _MIN_CONTRAST:
            return colour
    return 255.0 - under


def _draw_blob(canvas: np.ndarray, rng: np.random.Generator) -> None:
    size = canvas.shape[0]
    ry, rx = rng.uniform(2.0, 6.0, size=2)
    cy, cx = rng.uniform(0, size, size=2)
    y0, x0 = max(int(cy - ry), 0), max(int(cx - rx), 0)
    y, x = np.ogrid[y0:min(int(cy + ry) + 1, size), x0:min(int(cx + rx) + 1, size)]
    inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0
    canvas[y0:y0 + inside.shape[0], x0:x0 + inside.shape[1]][inside] = _random_colour(rng)


def _place(
        rng: np.random.Generator, size: int, k: int, taken: list[tuple[int, int, int, int]]
) -> tuple[int, int]:
    """A top-left corner for a k x k motif, avoiding earlier motifs when possible."""
    for _ in range(20):
        y0, x0 = (int(v) for v in rng.integers(0, size - k + 1, size=2))
        if all(y0 >= b[2] or y0 + k <= b[0] or x0 >= b[3] or x0 + k <= b[1] for b in taken):
            return y0, x0
    return y0, x0


def make_example(
        variant: Variant, image_size: int, split_id: int, index: int
) -> tuple[np.ndarray, int, np.ndarray]:
    """Generates example `index` of a split: (uint8 HWC image, label, (M,4) motif boxes)."""
    rng = np.random.default_rng([_DATASET_SEED, split_id, index])
    num_classes = len(variant.class_names)
    label = index % num_classes
    motif = MOTIFS[variant.class_names[label]]
    base = rng.uniform(70, 190) + rng.uniform(-25, 25, size=3)
    canvas = np.broadcast_to(base, (image_size, image_size, 3)).copy()
    for _ in range(int(rng.integers(image_size * image_size // 900, image_size * image_size // 500 + 2))):
        _draw_blob(canvas, rng)
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(int(rng.integers(variant.min_motifs, variant.max_motifs + 1))):
        k = int(rng.integers(variant.motif_sizes[0], variant.motif_sizes[1] + 1))
        y0, x0 = _place(rng, image_size, k, boxes)
        yy, xx = np.mgrid[:k, :k]
        region = canvas[y0:y0 + k, x0:x0 + k]
        region[motif(yy, xx, k)] = _contrasting_colour(rng, region.mean((0, 1)))
        boxes.append((y0, x0, y0 + k, x0 + k))
    canvas += rng.normal(0.0, 8.0, size=canvas.shape)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return image, label, np.asarray(boxes, np.int32)


def split_size(variant: Variant, split: str, train_size: int, eval_size: int) -> int:
    """Examples in a synthetic split: 'train' or the held-out 'validation' / 'test'."""
    if split not in _SPLIT_IDS:
        raise UserError(
            f"synthetic dataset has no split '{split}': use one of {sorted(_SPLIT_IDS)}"
        )
    if split == 'train':
        return variant.train_size or train_size
    return variant.eval_size or eval_size


@functools.lru_cache(maxsize=8)
def load_split(variant_name: str, split: str, num_examples: int, image_size: int) -> SyntheticSplit:
    """Generates (once per process, then cached) the first num_examples of a split."""
    variant = get_variant(variant_name)
    split_id = _SPLIT_IDS[split]
    images = np.empty((num_examples, image_size, image_size, 3), np.uint8)
    labels = np.empty((num_examples,), np.int32)
    boxes = []
    for i in range(num_examples):
        images[i], labels[i], b = make_example(variant, image_size, split_id, i)
        boxes.append(b)
    images.setflags(write=False)
    labels.setflags(write=False)
    return SyntheticSplit(images, labels, tuple(boxes))
