"""Heatmaps of BagNet class evidence: native stride, free CAMs, exact stride-1 maps, and plots.

Brendel & Bethge (ICLR 2019), section 4 and Fig. 2: a BagNet's image logit is the mean of its patch logits,
so the patch logit of a class *is* that patch's evidence. Three maps follow:

- ``class_evidence``: the native-stride map, ``patch_logits[..., c]`` on the ``(H', W')`` grid (stride 8).
- ``class_activation_map``: with the identity head (Qian 2020, thesis 3.4) the feature channel ``c`` is the
  class map of any fully convolutional model, BagNet or ResNet-50, at no extra cost.
- ``stride1_heatmap``: the paper's high-resolution map, one value per pixel: the logit of the rf x rf patch
  centred on that pixel of the zero-padded image (bethgelab ``utils.generate_heatmap_pytorch``). The
  reference runs ~50,000 patches through the network. Here one pass of the unchanged BagNet computes it, with
  ``flax.linen.intercept_methods`` changing two things: every conv is evaluated at stride 1 (as per-tap
  matrix products on the CPU, one convolution on GPUs), and a strided conv's output is split into its
  ``s x s`` phases, which become batch entries (polyphase shift-and-stitch, layer by layer: the a-trous
  algorithm). Later layers run unchanged on the larger batch, the 64 output phases interleave into the stride-1
  map, each layer is computed once per output pixel, and only the target class column of the head is
  evaluated. The values are the reference's. Several images can share one pass (``stride1_heatmap``).

Plots follow the reference's ``plot_heatmap``: RdBu_r, colour range symmetric at the 99th percentile of
``|heatmap|``, image edges drawn on top.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import scipy.ndimage
from flax import linen as nn
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from bagjax import atomic, patches
from bagjax.data import MEAN_RGB, STDDEV_RGB
from bagjax.models.heads import Head
from bagjax.errors import UserError

Classes = int | Sequence[int] | np.ndarray | jax.Array


def _class_indices(classes: Classes, batch: int, num_classes: int) -> jax.Array:
    """One class per image: an int broadcasts; a sequence must have one entry per image, each in range."""
    idx = np.asarray(classes)
    if not np.issubdtype(idx.dtype, np.integer):
        raise UserError(f"classes must be integers, got dtype {idx.dtype}")
    if idx.ndim == 0:
        idx = np.full((batch,), int(idx))
    if idx.shape != (batch,):
        raise UserError(f"classes must be an int or one per image ({batch}), got shape {idx.shape}")
    if idx.min() < 0 or idx.max() >= num_classes:
        raise UserError(f"classes must lie in [0, {num_classes}), got {idx.tolist()}")
    return jnp.asarray(idx, jnp.int32)


def _as_batch(images: jax.Array | np.ndarray) -> tuple[jax.Array, bool]:
    """``(H, W, 3)`` or ``(B, H, W, 3)`` -> ``(B, H, W, 3)`` and whether a batch axis was given."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim == 3:
        return images[None], False
    if images.ndim != 4:
        raise UserError(f"images must be HWC or NHWC, got shape {tuple(images.shape)}")
    return images, True


def _select(maps: jax.Array, classes: jax.Array) -> jax.Array:
    """``maps[b, ..., classes[b]]`` for ``maps`` of shape ``(B, ..., C)``."""
    return jax.vmap(lambda m, c: jnp.take(m, c, axis=-1))(maps, classes)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _class_map(model: nn.Module, variables: Any, images: jax.Array, classes: jax.Array, method: str) -> jax.Array:
    maps = model.apply(variables, images, train=False, method=method)
    return _select(maps.astype(jnp.float32), classes)


def class_evidence(model: nn.Module, variables: Any, images: jax.Array, classes: Classes) -> jax.Array:
    """Native-stride evidence of one class per image (or one for all): ``(B, H', W')``.

    ``patch_logits[..., c]`` (Brendel & Bethge 2019, Fig. 2): location (i, j) is the logit of the patch
    ``patches.patch_boxes(model, H, W)[i, j]``, and the image logit of class c is the map's mean.
    """
    patches.receptive_field(model)
    images, _ = _as_batch(images)
    return _class_map(model, variables, images, _class_indices(classes, images.shape[0], model.num_classes),
                      "patch_logits")


def class_activation_map(model: nn.Module, variables: Any, images: jax.Array, classes: Classes) -> jax.Array:
    """Free CAM of an identity-head model: feature channel ``c`` of the last block, ``(B, h, w)``.

    With the fixed identity head (Qian 2020, thesis 3.4) the logit of class c is the spatial mean of feature
    channel c, so that channel is the class activation map with no weighting to learn or apply. Works for a
    BagNet (grid ``(H', W')``) and ResNet-50 (``H/32 x W/32``), both through ``method='features'``.
    """
    head = getattr(model, "head", None)
    if head != "identity" or not hasattr(model, "features"):
        raise UserError(f"free CAMs need a model built with head='identity', got head={head!r}")
    images, _ = _as_batch(images)
    return _class_map(model, variables, images, _class_indices(classes, images.shape[0], model.num_classes),
                      "features")


def _as_pair(value: int | Sequence[int] | None) -> tuple[int, int]:
    value = 1 if value is None else value
    return (value, value) if isinstance(value, int) else tuple(value)


def _stride1_conv(module: nn.Conv, x: jax.Array) -> jax.Array:
    """The stride-1 output of an unpadded conv: per-tap matrix products on the CPU, a convolution elsewhere.

    ``y = sum_{i,j} x[:, i:i+h, j:j+w] @ W[i, j] (+ b)`` is the same unpadded convolution; XLA:CPU runs these
    products about 3x faster than its convolution, while on GPUs one cuDNN convolution beats k*k GEMMs whose
    partial sums each go through memory. A 1x1 conv is one matrix product everywhere.
    """
    if (module.padding not in ("VALID", ((0, 0), (0, 0)), 0) or _as_pair(module.kernel_dilation) != (1, 1)
            or _as_pair(module.input_dilation) != (1, 1) or module.feature_group_count != 1 or module.mask is not None):
        raise UserError(f"stride-1 heatmaps need plain unpadded convs (BagNet); {module.name} is not one")
    params = module.variables["params"]
    x, kernel, bias = nn.dtypes.promote_dtype(x, params["kernel"], params.get("bias"), dtype=module.dtype)
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1

    def per_tap(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return sum(jnp.dot(x[:, i:i + h, j:j + w], kernel[i, j], precision=module.precision)
                   for i in range(kh) for j in range(kw))

    def convolution(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            precision=module.precision)

    y = per_tap(x, kernel) if (kh, kw) == (1, 1) else jax.lax.platform_dependent(x, kernel, cpu=per_tap,
                                                                                 default=convolution)
    return y if bias is None else y + bias


def _polyphase_interceptor(levels: dict[int, tuple[int, int]]):
    """Interceptor computing every conv at stride 1 and splitting a strided conv's output into its phases.

    For an unpadded conv with stride s, output phase (p, q) of its stride-1 output (rows p, p+s, ...) is the
    strided conv of the input shifted by (p, q), so later layers, seeing one batch entry per phase, compute
    exactly the network on every shifted input (shift-and-stitch, layer by layer). The new batch is
    phase-major, ``(s * s, N)``. ``levels`` records the strides per input batch size: convs on parallel
    branches (a bottleneck's conv2 and its downsample) split the same batch, hence one level.
    """

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, nn.Conv) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        x = args[0]
        y = _stride1_conv(module, x)
        sy, sx = _as_pair(module.strides)
        if (sy, sx) == (1, 1):
            return y
        if levels.setdefault(x.shape[0], (sy, sx)) != (sy, sx):
            raise ValueError(f"parallel strided convs must share their stride, {module.name} has {(sy, sx)}")
        n, h, w, c = y.shape
        h, w = h // sy, w // sx  # every phase keeps the same number of rows and columns
        y = y[:, : h * sy, : w * sx].reshape(n, h, sy, w, sx, c).transpose(2, 4, 0, 1, 3, 5)
        return y.reshape(sy * sx * n, h, w, c)

    return intercept


def _one_class_head(targets: jax.Array):
    """Interceptor narrowing the classifier head to each item's ``targets`` class: output ``(..., 1)``.

    The head sees the phase-major batch ``(P * G, h, w, F)`` of ``G`` items, so entry ``k`` belongs to item
    ``k % G``. The learned head (thesis Eq. 3.3) then costs one column of W per item, not all C (at 1,000
    classes that is ~10% of a stride-1 map's FLOPs); the other heads are evaluated in full and the class is
    picked afterwards.
    """

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, Head) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        x = args[0]
        items = targets.shape[0]
        if module.kind != "learned":
            y = next_fun(*args, **kwargs)
            y = y.reshape(-1, items, *y.shape[1:])
            return jax.vmap(lambda m, c: jnp.take(m, c, axis=-1), (1, 0), 1)(y, targets).reshape(*x.shape[:-1], 1)
        params = module.variables["params"]
        columns = jnp.take(params["kernel"], targets, axis=1).astype(module.dtype)  # (F, G)
        x = x.astype(module.dtype).reshape(-1, items, *x.shape[1:])
        y = jnp.einsum("pghwf,fg->pghw", x, columns).astype(jnp.float32)
        y = y + jnp.take(params["bias"], targets)[:, None, None]
        return y.reshape(*args[0].shape[:-1], 1)

    return intercept


def _interleave(phase_maps: jax.Array, levels: Sequence[tuple[int, int]]) -> jax.Array:
    """Undo the polyphase batch ``(P_L, ..., P_1)`` of one image's ``(N, h, w)`` maps: ``(h * S_y, w * S_x)``.

    Output row ``y = i * S_y + sum_l p_l * prod_{m<l} s_m``: the last level is the most significant digit.
    """
    n = len(levels)
    gh, gw = phase_maps.shape[1:]
    maps = phase_maps.reshape([s for sy, sx in reversed(levels) for s in (sy, sx)] + [gh, gw])
    maps = maps.transpose([2 * n, *range(0, 2 * n, 2), 2 * n + 1, *range(1, 2 * n, 2)])
    return maps.reshape(gh * math.prod(sy for sy, _ in levels), gw * math.prod(sx for _, sx in levels))


def _stride1_logits(model: nn.Module, variables: Any, padded: jax.Array, targets: jax.Array) -> jax.Array:
    """Stride-1 logits of class ``targets[g]`` for each padded item ``(G, H_pad, W_pad, 3)``, in one polyphase pass."""
    levels: dict[int, tuple[int, int]] = {}
    with nn.intercept_methods(_polyphase_interceptor(levels)), nn.intercept_methods(_one_class_head(targets)):
        logits = model.apply(variables, padded, train=False, method="patch_logits")
    phases = logits[..., 0].reshape(-1, padded.shape[0], *logits.shape[1:3])  # (P, G, h, w), phase-major
    return jax.vmap(functools.partial(_interleave, levels=list(levels.values())), 1)(phases)


def default_chunk_pixels() -> int:
    """Output pixels per polyphase pass: 2**15 on the CPU (~1 GB of temporaries for BagNet-33), 2**18 elsewhere."""
    return 2**15 if jax.default_backend() == "cpu" else 2**18


def stride1_heatmap(model: nn.Module, variables: Any, images: jax.Array, target_class: Classes, *,
                    chunk_pixels: int | None = None) -> jax.Array:
    """Per-pixel evidence: the class logit of the rf x rf patch centred on every pixel, ``(H, W)`` or ``(B, H, W)``.

    The paper's high-resolution heatmap (Brendel & Bethge 2019, Fig. 2; bethgelab ``generate_heatmap_pytorch``):
    the normalized image is zero-padded by ``(rf - 1) // 2`` before (and the rest of ``rf - 1`` after) each
    axis and pixel (y, x) gets the logit of the padded patch ``[y, y + rf) x [x, x + rf)``. Computed exactly
    by polyphase decomposition of the strided convs (module docstring), not patch by patch. Memory is bounded
    by ``chunk_pixels`` output pixels per pass (``default_chunk_pixels()``; BagNet-33 at full width needs
    ~1 GB of temporaries per 2**15): several whole images share a pass when they fit (a batch of images is
    one pass per phase), and an image larger than that is cut into horizontal bands.
    """
    patches.receptive_field(model)
    chunk_pixels = default_chunk_pixels() if chunk_pixels is None else chunk_pixels
    if chunk_pixels < 1:
        raise UserError(f"chunk_pixels must be positive, got {chunk_pixels}")
    batch_images, batched = _as_batch(images)
    classes = _class_indices(target_class, batch_images.shape[0], model.num_classes)
    heatmaps = _stride1_heatmaps(model, variables, batch_images, classes, chunk_pixels)
    return heatmaps if batched else heatmaps[0]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _stride1_heatmaps(model: nn.Module, variables: Any, images: jax.Array, classes: jax.Array,
                      chunk_pixels: int) -> jax.Array:
    rf, stride = patches.receptive_field(model)
    batch, height, width, _ = images.shape
    # Whole output grids (extra rows/cols are cropped at the end), so every phase has the same size.
    full_width = -(-width // stride) * stride
    grid_rows = -(-height // stride)
    bands = min(grid_rows, -(-grid_rows * stride * full_width // chunk_pixels))
    band_rows = -(-grid_rows // bands) * stride
    bands = -(-grid_rows * stride // band_rows)
    lo = (rf - 1) // 2
    padded = jnp.pad(images, ((0, 0), (lo, bands * band_rows - height + rf - 1 - lo),
                              (lo, full_width - width + rf - 1 - lo), (0, 0)))
    # Items are (image, band) pairs; a pass takes as many as fit in chunk_pixels (the last pass is padded with
    # repeats of the first items, whose maps are dropped).
    items = batch * bands
    per_pass = max(1, min(items, chunk_pixels // (band_rows * full_width)))
    passes = -(-items // per_pass)
    b, r = jnp.divmod(jnp.arange(passes * per_pass) % items, bands)

    def one_pass(item: tuple[jax.Array, jax.Array]) -> jax.Array:
        bs, rs = item
        rows = jax.vmap(lambda b, r: jax.lax.dynamic_slice_in_dim(padded[b], r * band_rows, band_rows + rf - 1, 0))(
            bs, rs)
        return _stride1_logits(model, variables, rows, classes[bs])

    maps = jax.lax.map(one_pass, (b.reshape(passes, per_pass), r.reshape(passes, per_pass)))
    maps = maps.reshape(passes * per_pass, band_rows, full_width)[:items]
    return maps.reshape(batch, bands * band_rows, full_width)[:, :height, :width]


def denormalize(images: jax.Array | np.ndarray) -> np.ndarray:
    """Undo the torchvision normalization: float ``(..., 3)`` -> uint8 RGB in [0, 255] for display."""
    images = np.asarray(images, np.float32)
    rgb = images * np.asarray(STDDEV_RGB, np.float32) + np.asarray(MEAN_RGB, np.float32)
    return np.clip(np.round(rgb * 255.0), 0, 255).astype(np.uint8)


def _display_image(image: jax.Array | np.ndarray) -> np.ndarray:
    """uint8 images are shown as they are; float images are taken as normalized and denormalized."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise UserError(f"an image must be HWC with 1 or 3 channels, got shape {image.shape}")
    return image if image.dtype == np.uint8 else denormalize(image)


def edge_map(image: jax.Array | np.ndarray, *, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> np.ndarray:
    """Thin image edges, bool ``(H, W)``: a Canny detector standing in for the reference's ``skimage.feature.canny``.

    Grey level in [0, 1], Gaussian smoothing (``sigma``), Sobel gradients, non-maximum suppression along the
    gradient direction (quantised to 4 directions), then hysteresis: maxima above ``high`` and the maxima
    above ``low`` connected to them. The defaults are skimage's for float images.
    """
    grey = _display_image(image).astype(np.float32).mean(axis=-1) / 255.0
    grey = scipy.ndimage.gaussian_filter(grey, sigma)
    gy, gx = scipy.ndimage.sobel(grey, axis=0), scipy.ndimage.sobel(grey, axis=1)
    magnitude = np.hypot(gx, gy)
    direction = np.round(np.arctan2(gy, gx) / (np.pi / 4)).astype(int) % 4  # 0: -, 1: \, 2: |, 3: /
    padded = np.pad(magnitude, 1)
    h, w = magnitude.shape
    is_max = np.zeros(magnitude.shape, dtype=bool)
    for d, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        ahead = padded[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        behind = padded[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
        is_max |= (direction == d) & (magnitude >= ahead) & (magnitude >= behind)
    weak = is_max & (magnitude >= low)
    labels, _ = scipy.ndimage.label(weak, structure=np.ones((3, 3)))
    strong = np.unique(labels[weak & (magnitude >= high)])
    return np.isin(labels, strong[strong > 0])


def symmetric_limit(heatmap: jax.Array | np.ndarray, percentile: float = 99.0) -> float:
    """The colour limit ``v`` of the range ``[-v, v]``: the ``percentile`` of ``|heatmap|`` (reference plot_heatmap)."""
    if not 0 < percentile <= 100:
        raise UserError(f"percentile must be in (0, 100], got {percentile}")
    limit = float(np.percentile(np.abs(np.asarray(heatmap, np.float32)), percentile))
    return limit if limit > 0 else 1.0  # an all-zero map still gets a valid colour range


def _new_axes() -> Axes:
    figure = Figure()
    FigureCanvasAgg(figure)
    return figure.add_subplot()


def plot_heatmap(heatmap: jax.Array | np.ndarray, image: jax.Array | np.ndarray | None = None, ax: Axes | None = None,
                 *, percentile: float = 99.0, cmap: str = "RdBu_r", alpha: float = 0.25) -> AxesImage:
    """Draw a heatmap as bethgelab's ``plot_heatmap`` does; returns the heatmap's ``AxesImage``.

    Colour map ``cmap`` over the symmetric range ``[-v, v]`` with ``v`` the ``percentile`` of ``|heatmap|``
    (values beyond are clipped), so zero evidence is white. With ``image`` (normalized float or uint8 HWC)
    its edges (``edge_map``) are drawn on top in black at ``alpha``, and a coarse map (native stride) is
    stretched over the image's extent. Without ``ax`` a new Agg figure is made (no pyplot state).
    """
    heatmap = np.asarray(heatmap, np.float32)
    if heatmap.ndim != 2:
        raise UserError(f"heatmap must be 2-D (H, W), got shape {heatmap.shape}")
    ax = _new_axes() if ax is None else ax
    height, width = heatmap.shape if image is None else np.asarray(image).shape[:2]
    extent = (0, width, height, 0)
    limit = symmetric_limit(heatmap, percentile)
    shown = ax.imshow(heatmap, cmap=cmap, vmin=-limit, vmax=limit, extent=extent, interpolation="none")
    if image is not None:
        edges = np.where(edge_map(image), 0.0, np.nan)  # NaN is transparent, 0 is black in Greys_r
        greys = matplotlib.colormaps["Greys_r"].with_extremes(bad=(0, 0, 0, 0))
        ax.imshow(edges, cmap=greys, vmin=0, vmax=1, alpha=alpha, extent=extent, interpolation="none")
    ax.set_axis_off()
    return shown


def save_heatmap_figure(path: str | os.PathLike, images: jax.Array | np.ndarray, heatmaps: jax.Array | np.ndarray,
                        titles: Sequence[str] | None = None, *, percentile: float = 99.0) -> None:
    """Write a PNG grid with one row per image: the image, then its heatmap with the image's edges on top.

    ``images`` are normalized NHWC floats (or uint8), ``heatmaps`` ``(B, h, w)`` at any stride; ``titles``
    label the heatmaps (e.g. the class). Parent directories are created.
    """
    images, heatmaps = np.asarray(images), np.asarray(heatmaps)
    if images.ndim != 4 or heatmaps.ndim != 3 or len(images) != len(heatmaps):
        raise UserError(f"need images (B, H, W, 3) and heatmaps (B, h, w) with the same B, got {images.shape} "
                        f"and {heatmaps.shape}")
    if titles is not None and len(titles) != len(images):
        raise UserError(f"need one title per image ({len(images)}), got {len(titles)}")
    figure = Figure(figsize=(6, 3 * len(images)))
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(images), 2, squeeze=False)
    for row, (image, heatmap) in enumerate(zip(images, heatmaps)):
        axes[row, 0].imshow(_display_image(image))
        axes[row, 0].set_axis_off()
        plot_heatmap(heatmap, image, axes[row, 1], percentile=percentile)
        if titles is not None:
            axes[row, 1].set_title(titles[row])
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic.replacing(path) as tmp:  # whole or absent, even if the command is stopped meanwhile
        figure.savefig(tmp, format="png", dpi=100)


if __name__ == "__main__":
    sys.exit("error: bagjax.interpret is the heatmap library (see its docstring); for the heatmaps of image files "
             "run python -m bagjax.predict --workdir WORKDIR IMAGE|FOLDER [--stride1]")
