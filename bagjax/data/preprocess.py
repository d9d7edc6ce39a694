"""Image decoding and the torchvision-style preprocessing used by every source.

Converted official weights (BagNet, torchvision ResNet-50) expect the
torchvision input pipeline: RGB in [0, 1], normalized by the ImageNet mean and
std; for training an inception-style RandomResizedCrop plus horizontal flip,
for evaluation Resize(S / crop_fraction) then CenterCrop(S) (BagNet paper
Sec. 3 trains and evaluates with this standard ImageNet recipe).

Everything here is numpy + PIL (no TensorFlow), so it runs on machines without
TF and the same code serves training, evaluation and `bagjax.predict`. The
transforms return uint8 images: the normalization runs on the device, inside
the jitted step (`normalize` works on numpy and JAX arrays alike). A JPEG that
is still unloaded (`open_image`) is decoded in draft mode (DCT-domain
downscaling by 2, 4 or 8) when the region kept is at least twice the output
size, as for large photos.
"""

from __future__ import annotations

import io
import math
import os

import numpy as np
from PIL import Image

from bagjax.errors import UserError

MEAN_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)
STDDEV_RGB: tuple[float, float, float] = (0.229, 0.224, 0.225)

# torchvision RandomResizedCrop defaults (Szegedy et al. "Going deeper", Sec. 6).
CROP_ASPECT_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)

_MEAN = np.asarray(MEAN_RGB, np.float32) * 255.0
_INV_STD = 1.0 / (np.asarray(STDDEV_RGB, np.float32) * 255.0)
_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')


def normalize(image_uint8):
    """uint8 ...HWC RGB -> float32 (x / 255 - mean) / std, the torchvision normalization.

    Takes numpy or JAX arrays (call it inside jit: uint8 crosses to the device).
    """
    return (image_uint8.astype(np.float32) - _MEAN) * _INV_STD


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB.

    Grayscale, palette, RGBA/LA (alpha dropped, as torchvision's loader does) and
    CMYK go through PIL's convert; 16-bit modes are rescaled to 8 bit first,
    because PIL's own I;16 -> RGB conversion clips at 255 instead of scaling.
    """
    if image.mode == 'RGB':
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert('RGB')
    return image.convert('RGB')


def _unreadable(name: str, error: Exception) -> ValueError:
    detail = ' '.join(str(error).split()) or type(error).__name__
    return ValueError(f'unreadable image {name}: {detail}')


def open_image(source: str | bytes) -> Image.Image:
    """Opens a file path or encoded bytes without decoding the pixels (header only).

    The transforms below decode it, in JPEG draft mode where that is exact enough.
    Raises ValueError (one line) when the header is not an image's.
    """
    name = source if isinstance(source, str) else '<bytes>'
    try:
        image = Image.open(source if isinstance(source, str) else io.BytesIO(source))
    except Exception as e:  # PIL raises many exception types for bad files.
        raise _unreadable(name, e) from e
    image.info['bagjax_name'] = name
    return image


def open_rgb(source: str | bytes, *, draft_size: int | None = None) -> Image.Image:
    """Decodes a file path or encoded bytes into a loaded RGB PIL image.

    draft_size lets JPEG decode at reduced scale (DCT scaling), used by the
    readability scan where only "does it decode completely" matters.
    Raises ValueError (one line) for anything PIL cannot fully decode:
    zero-byte, truncated, garbage or unsupported files.
    """
    name = source if isinstance(source, str) else '<bytes>'
    try:
        stream = source if isinstance(source, str) else io.BytesIO(source)
        with Image.open(stream) as image:
            if draft_size is not None:
                image.draft('RGB', (draft_size, draft_size))
            image.load()
            return to_rgb(image)
    except Exception as e:  # PIL raises many exception types for bad files.
        raise _unreadable(name, e) from e


def load_image_file(path: str) -> np.ndarray:
    """Reads an image file as RGB uint8 HWC (odd modes converted, see to_rgb)."""
    if not os.path.isfile(path):
        raise UserError(f'unreadable image {path}: no such file')
    return np.asarray(open_rgb(path), dtype=np.uint8)


def _as_pil(
        image: np.ndarray | Image.Image, draft: tuple[int, int] | None = None
) -> Image.Image:
    """A loaded RGB PIL image; an unloaded JPEG is decoded at the smallest DCT scale >= draft (w, h)."""
    if isinstance(image, Image.Image):
        if getattr(image, 'fp', None) is not None:  # Opened, pixels not yet decoded.
            try:
                if draft is not None and image.format == 'JPEG':
                    image.draft(image.mode, draft)
                image.load()
            except Exception as e:  # PIL raises many exception types for bad files.
                image.close()
                raise _unreadable(image.info.get('bagjax_name', '<image>'), e) from e
        return to_rgb(image)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise UserError(
            f'expected an RGB uint8 HWC image, got dtype {array.dtype} shape {array.shape}'
        )
    return Image.fromarray(array)


def random_resized_crop_box(
        rng: np.random.Generator,
        height: int,
        width: int,
        scale: tuple[float, float],
        ratio: tuple[float, float] = CROP_ASPECT_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: returns (top, left, h, w).

    Ten tries of area ~ U(scale) * H * W and log-aspect ~ U(log ratio); if none
    fits, a center crop with the aspect ratio clamped into `ratio`.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def preprocess_for_train(
        image: np.ndarray | Image.Image,
        rng: np.random.Generator,
        image_size: int,
        *,
        scale: tuple[float, float],
        ratio: tuple[float, float] = CROP_ASPECT_RATIO,
        flip: bool = True,
) -> np.ndarray:
    """RandomResizedCrop(image_size, scale, ratio) + optional horizontal flip, uint8 out.

    PIL's resize with a source box crops and resizes (bilinear, antialiased) in
    one step, like torchvision's PIL backend. The crop box is drawn on the full
    image size (known from the header); a JPEG whose crop is >= 2x image_size
    is decoded at reduced scale and the box scaled with it.
    """
    width, height = image.size if isinstance(image, Image.Image) else image.shape[1::-1]
    top, left, h, w = random_resized_crop_box(rng, height, width, scale, ratio)
    draft = (math.ceil(width * image_size / w), math.ceil(height * image_size / h))
    pil = _as_pil(image, draft)
    sx, sy = pil.width / width, pil.height / height
    out = pil.resize(
        (image_size, image_size), Image.BILINEAR,
        box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy),
    )
    array = np.asarray(out, dtype=np.uint8)
    if flip and rng.random() < 0.5:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)


def preprocess_for_eval(
        image_uint8_hwc: np.ndarray | Image.Image,
        image_size: int,
        crop_fraction: float = 0.875,
) -> np.ndarray:
    """Resize the shorter side to floor(image_size / crop_fraction), center crop; uint8 out.

    Matches torchvision Resize(256) + CenterCrop(224) for image_size 224.
    """
    if not 0.0 < crop_fraction <= 1.0:
        raise UserError(f'crop_fraction must be in (0, 1], got {crop_fraction}')
    image = image_uint8_hwc
    short = int(math.floor(image_size / crop_fraction + 1e-6))
    width, height = image.size if isinstance(image, Image.Image) else image.shape[1::-1]
    if width <= height:
        new_w, new_h = short, int(short * height / width)
    else:
        new_w, new_h = int(short * width / height), short
    pil = _as_pil(image, (new_w, new_h))
    if (new_w, new_h) != pil.size:
        pil = pil.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    pil = pil.crop((left, top, left + image_size, top + image_size))
    return np.asarray(pil, dtype=np.uint8)


def resize_full(image: np.ndarray | Image.Image, image_size: int) -> np.ndarray:
    """Resize the whole image to image_size x image_size (no crop); uint8 out.

    Used for evaluating the synthetic set, whose evidence can sit at the border.
    """
    pil = _as_pil(image, (image_size, image_size))
    if pil.size != (image_size, image_size):
        pil = pil.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(pil, dtype=np.uint8)
