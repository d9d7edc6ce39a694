"""Checks of what a written figure shows: its pixel size, that it is not blank, and where its colours are."""

import pathlib

import numpy as np
from PIL import Image


def read_figure(path: str | pathlib.Path, size: tuple[int, int]) -> np.ndarray:
    """The PNG at ``path`` as RGB uint8 ``(H, W, 3)``, after checking its (width, height) and that it shows something.

    Not blank: at least 2 % of the pixels differ from the most common colour (the background) and there are
    at least 32 distinct colours (text alone on a white page has a few anti-aliased greys).
    """
    with Image.open(path) as image:
        assert image.format == "PNG", f"{path} is {image.format}, not PNG"
        assert image.size == size, f"{path} is {image.size[0]}x{image.size[1]} px, expected {size[0]}x{size[1]}"
        pixels = np.asarray(image.convert("RGB"))
    flat = pixels.reshape(-1, 3)
    colours, counts = np.unique(flat, axis=0, return_counts=True)
    background = colours[np.argmax(counts)]
    drawn = np.any(flat != background, axis=-1).mean()
    assert drawn > 0.02 and len(colours) >= 32, f"{path} looks blank: {drawn:.1%} drawn, {len(colours)} colours"
    return pixels


def red(pixels: np.ndarray) -> np.ndarray:
    """Where a diverging map (RdBu_r) shows strongly positive values: bool ``(H, W)``."""
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    return (r > b + 30) & (r > g + 30)


def blue(pixels: np.ndarray) -> np.ndarray:
    """Where a diverging map (RdBu_r) shows strongly negative values: bool ``(H, W)``."""
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    return (b > r + 30) & (b > g + 20)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Half-open ``(y0, x0, y1, x1)`` of the True pixels."""
    ys, xs = np.nonzero(mask)
    assert len(ys), "nothing to bound"
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def share_of_colour(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12) -> float:
    """The fraction of pixels within ``tolerance`` (per channel) of ``rgb``, e.g. a matplotlib line colour."""
    return float(np.all(np.abs(pixels.astype(int) - np.asarray(rgb)) <= tolerance, axis=-1).mean())


# matplotlib's default colour cycle: tab:blue, tab:orange, tab:green.
TAB_BLUE, TAB_ORANGE, TAB_GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)
