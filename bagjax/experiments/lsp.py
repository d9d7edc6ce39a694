"""Localized multi-scale semantic patches for downstream classification (AnchorNet sections 3.3 and 4.3).

    python -m bagjax.experiments.lsp --workdir DIR --downstream DIR2 [--setting visualization|slack|both]
                                     [--max-examples N] [--out DIR] [--patch-input native|resize]
                                     [--input-scale F]

``DIR`` is an AnchorNet training workdir, ``DIR2`` any bagjax classifier workdir (BagNet or ResNet-50)
with the same classes. For every image of DIR's eval split (DIR's preprocessing and image size):

1. AnchorNet picks the class gamma and the branch B^theta (Eq. 6-8) and LSP (Algorithm 1) localizes up to
   K^theta patches of theta x theta px on that branch's class map, with the paper's settings (section 4.1):
   ``visualization`` K = 5/3/2, T = 0.3, P = .05/.04/.03, or ``slack`` K = 24/10/8, T = 0.8, P = 0.3.
2. Table 3: the classifier labels each patch; the image's class is the argmax of the patch softmaxes
   summed over its valid patches. Baseline: the same classifier on the full image.
3. Table 4: "-L" classifies only the top patch (the map's maximum, LSP's first pick) and "-R" the whole
   image rescaled to theta x theta, per branch over the images AnchorNet assigned to it.

The paper fine-tunes its classifiers on training patches and feeds them theta x theta inputs. Here the
classifier is used as trained, with no fine-tuning, and ``--patch-input`` says what it sees:

- ``native`` (default, the paper): patches and "-R" images at theta x theta px, the full image at DIR's
  size. Every input keeps the pixel scale of DIR's images, so full image, patches and rescaled images are
  compared at the same object scale (any fully convolutional classifier with global pooling takes them).
  ``--input-scale F`` resizes all of them by the same factor F (round(F * theta) px patches, the full image
  at round(F * size)), for a classifier trained at another pixel scale than DIR's images: the demos use 0.5,
  since the AnchorNet demo upsamples its 56 px renders to 112 px while the BagNet demo sees 48 px renders
  at 48 px;
- ``resize``: every classifier input is bilinearly resized (antialiased when shrinking) to DIR2's training
  image size. Patches (theta px) and full images (DIR's size) are then rescaled by different factors, which
  confounds the comparison with object scale; use it for a classifier that only works at its training size.

FLOPs per image come from XLA's cost analysis (``jit(f).lower(...).compile().cost_analysis()``): AnchorNet at
its size plus the classifier at its input size times the average number of patches. XLA counts a
multiply-add as 2 FLOPs; the paper's "FLOPs" are multiply-adds, so halve ours to compare. The paper's Table 3
counts the classifier alone; both columns are given. Everything runs on one device (``jax.devices()[0]``).
Outputs in ``--out`` (default ``DIR/lsp``): ``lsp.md``, ``lsp.csv``, ``lsp_patches.png`` (localized patches,
Figure 3) and ``lsp_attention.png`` (spatial attention maps S of the three branches, Figure 5).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the eval pipeline uses tf.data; keep its logs quiet

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Mapping, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402

from bagjax import data  # noqa: E402
from bagjax.experiments import report  # noqa: E402
from bagjax.localize import LSP_SLACK, LSP_VISUALIZATION, LSPSettings, crop_patches, localize_patches  # noqa: E402
from bagjax.models.anchornet import RECEPTIVE_FIELDS  # noqa: E402
from bagjax.workdir import Trained, load_trained  # noqa: E402

SETTINGS: dict[str, Mapping[int, LSPSettings]] = {"visualization": LSP_VISUALIZATION, "slack": LSP_SLACK}
PATCH_INPUTS = ("native", "resize")
FIGURE_IMAGES = 6
BRANCH_COLORS = {63: "#e41a1c", 95: "#377eb8", 111: "#4daf4a"}  # boxes in lsp_patches.png


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Classifier input side for the full image, the theta-px patches / rescaled images (``--patch-input``)."""

    mode: str
    full: int
    patch: Mapping[int, int]

    scale: float = 1.0

    @staticmethod
    def make(mode: str, anchornet_size: int, classifier_size: int, scale: float = 1.0) -> "Inputs":
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"--input-scale must be a positive number, got {scale}")
        if mode == "resize":
            if scale != 1.0:
                raise ValueError("--input-scale applies to --patch-input native only (resize feeds every input "
                                 "at the classifier's training size); drop one of them")
            return Inputs(mode, classifier_size, {rf: classifier_size for rf in RECEPTIVE_FIELDS})
        if mode == "native":
            patch = {rf: max(1, round(rf * scale)) for rf in RECEPTIVE_FIELDS}
            return Inputs(mode, max(1, round(anchornet_size * scale)), patch, scale)
        raise ValueError(f"unknown --patch-input {mode!r}: choose one of {', '.join(PATCH_INPUTS)}")


def resize(images: jax.Array, size: int) -> jax.Array:
    """Bilinear resize of NHWC images to ``size`` x ``size`` (antialiased when shrinking); identity at that size."""
    if images.shape[1:3] == (size, size):
        return images
    return jax.image.resize(images, (images.shape[0], size, size, images.shape[-1]), "bilinear")


def gather_patches(images: jax.Array, index: jax.Array, boxes: jax.Array, *, patch_size: int,
                   out_size: int) -> jax.Array:
    """Patch ``n`` is ``boxes[n]`` of ``images[index[n]]``: ``(B, H, W, 3), (N,), (N, 4) -> (N, S, S, 3)``.

    A flat list of only the valid patches, so the classifier never runs on LSP's empty slots.
    """
    valid = jnp.ones((index.shape[0], 1), bool)
    return crop_patches(images[index], boxes[:, None], valid, patch_size=patch_size, out_size=out_size)[:, 0]


# ----------------------------------------------------------------------------------------------- jitted steps
class Steps:
    """The jitted functions of one run: AnchorNet forward, LSP per setting, and the classifier's three uses."""

    def __init__(self, anchornet: Trained, classifier: Trained, settings: Sequence[str], inputs: Inputs):
        a_model, c_model = anchornet.model, classifier.model

        def probs(variables, x):
            return jax.nn.softmax(c_model.apply(variables, x, train=False).astype(jnp.float32), axis=-1)

        self.forward = jax.jit(lambda v, x: a_model.apply(v, x, train=False))
        self.localize = {name: jax.jit(functools.partial(localize_patches, settings=SETTINGS[name]))
                         for name in settings}
        self.full = jax.jit(lambda v, x: probs(v, resize(x, inputs.full)))
        self.rescaled = {rf: jax.jit(lambda v, x, rf=rf: probs(v, resize(resize(x, rf), inputs.patch[rf])))
                         for rf in RECEPTIVE_FIELDS}
        self.patches = {rf: jax.jit(lambda v, x, i, b, rf=rf: probs(v, gather_patches(
            x, i, b, patch_size=rf, out_size=inputs.patch[rf]))) for rf in RECEPTIVE_FIELDS}
        self.classifier = jax.jit(lambda v, x: c_model.apply(v, x, train=False))


def xla_flops(compiled: Any) -> float:
    """FLOPs of a compiled executable by XLA's cost analysis (a multiply-add counts 2)."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def classifier_flops(steps: Steps, variables: Any, sizes: Sequence[int]) -> dict[int, float]:
    """FLOPs of one classifier forward pass per input side."""
    return {s: xla_flops(steps.classifier.lower(variables, jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32))
                         .compile()) for s in sorted(set(sizes))}


# ----------------------------------------------------------------------------------------------- the run
def _hits(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 and top-5 correctness per row of ``probs`` (B, C)."""
    top5 = np.argsort(-probs, axis=-1, kind="stable")[:, : min(5, probs.shape[-1])]
    return top5[:, 0] == labels, np.any(top5 == labels[:, None], axis=-1)


def run_lsp(anchornet: Trained, classifier: Trained, *, settings: Sequence[str] = ("slack",),
            patch_input: str = "native", input_scale: float = 1.0, max_examples: int | None = None,
            batch_size: int | None = None, patch_batch: int = 256,
            figure_images: int = FIGURE_IMAGES) -> dict[str, Any]:
    """Localize, crop and classify over DIR's eval split; returns per-image results, FLOPs and figure data.

    Per-image arrays (one entry per evaluated image, in split order): ``label``, ``cls`` (gamma, Eq. 7),
    ``branch`` (index into ``RECEPTIVE_FIELDS``), ``{name}_top1``/``{name}_top5`` for ``full``, ``anchornet``
    (top-1: gamma; top-5: of the chosen branch B^theta, whose top class gamma is), ``L`` (top patch), ``R``
    (image rescaled to the own branch's theta) and every setting (summed patch softmaxes), and
    ``{setting}_patches`` (valid patches per image). ``patch_input`` and ``input_scale`` set the classifier's
    input sizes (``Inputs``; ``--patch-input`` and ``--input-scale`` in the module docstring).
    """
    _check_pair(anchornet, classifier)
    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings:
        raise ValueError(f"unknown LSP setting(s) {bad}: choose from {', '.join(SETTINGS)}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"--max-examples must be at least 1, got {max_examples}")
    if patch_batch < 1:
        raise ValueError(f"--patch-batch must be at least 1, got {patch_batch}")
    config = anchornet.config.copy_and_resolve_references()
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
        config.eval_batch_size = batch_size
    size = int(config.image_size)
    inputs = Inputs.make(patch_input, size, int(classifier.config.image_size), input_scale)
    smallest, rf = min(inputs.full, *inputs.patch.values()), getattr(classifier.model, "receptive_field", 1)
    if smallest < rf:
        raise ValueError(f"--input-scale {input_scale:g} gives {smallest} px classifier inputs, below "
                         f"{classifier.config.model}'s receptive field of {rf} px: use --input-scale "
                         f"{math.ceil(100 * rf / min(RECEPTIVE_FIELDS)) / 100:g} or more")
    steps = Steps(anchornet, classifier, settings, inputs)
    a_vars, c_vars = jax.device_put(anchornet.variables), jax.device_put(classifier.variables)
    total = data.dataset_info(config).num_eval
    total = total if max_examples is None else min(total, max_examples)

    per_image: dict[str, list[np.ndarray]] = {}
    figure: dict[str, Any] = {}
    forward, anchornet_flops = None, float("nan")
    count, offset, num_patches = 0, 0, 0
    start = time.perf_counter()
    bar = tqdm.tqdm(total=total, desc="lsp", unit="img", dynamic_ncols=True, mininterval=1.0)
    try:
        for batch in data.eval_batches(config, process_index=0, process_count=1):
            b = len(batch["label"])
            keep = np.asarray(batch["mask"], bool) & (np.arange(offset, offset + b) < total)
            offset += b
            if not keep.any():
                break
            images = jax.jit(data.normalize)(batch["image"])  # uint8 to the device, normalized there
            labels = np.asarray(batch["label"])
            if forward is None:  # compiled once (eval batches share one shape); its cost over the batch size
                forward = steps.forward.lower(a_vars, images).compile()
                anchornet_flops = xla_flops(forward) / b
            outputs = forward(a_vars, images)
            maps = {"logits": outputs["logits"], "class_maps": outputs["class_maps"]}
            located = {name: jax.device_get(steps.localize[name](maps)) for name in settings}
            branch = np.asarray(located[settings[0]]["branch"])
            cls = np.asarray(located[settings[0]]["cls"])
            full = np.asarray(steps.full(c_vars, images))
            rescaled = np.zeros_like(full)
            for j, rf in enumerate(RECEPTIVE_FIELDS):
                if np.any(branch == j):
                    rescaled[branch == j] = np.asarray(steps.rescaled[rf](c_vars, images))[branch == j]
            chosen = np.stack([np.asarray(outputs["logits"][rf]) for rf in RECEPTIVE_FIELDS])[branch, np.arange(b)]
            results = {"label": labels, "cls": cls, "branch": branch, "anchornet_top1": cls == labels,
                       "anchornet_top5": _hits(chosen, labels)[1]}  # gamma tops B^theta (Eq. 7-8)
            results["full_top1"], results["full_top5"] = _hits(full, labels)
            results["R_top1"], results["R_top5"] = _hits(rescaled, labels)
            for n, name in enumerate(settings):
                summed, top, counts = _classify_patches(steps, c_vars, images, located[name], keep, patch_batch,
                                                        full.shape[-1])
                results[f"{name}_top1"], results[f"{name}_top5"] = _hits(summed, labels)
                results[f"{name}_patches"] = counts
                num_patches += int(counts.sum())
                if n == 0:  # LSP's first pick is the map's maximum whatever the setting
                    results["L_top1"], results["L_top5"] = _hits(top, labels)
            for key, value in results.items():
                per_image.setdefault(key, []).append(np.asarray(value)[keep])
            if not figure and figure_images > 0:
                figure = _figure_data(batch, outputs, located, keep, figure_images)
            count += int(keep.sum())
            bar.update(int(keep.sum()))
            bar.set_postfix(patches_per_s=f"{num_patches / max(time.perf_counter() - start, 1e-9):.0f}")
    finally:
        bar.close()
    if count == 0:
        raise ValueError("the eval split is empty: check the AnchorNet workdir's config.data.eval_split")
    return {
        "images": {k: np.concatenate(v) for k, v in per_image.items()},
        "settings": tuple(settings),
        "inputs": inputs,
        "anchornet_size": size,
        "anchornet_flops": anchornet_flops,
        "classifier_flops": classifier_flops(steps, c_vars, [inputs.full, *inputs.patch.values()]),
        "seconds": time.perf_counter() - start,
        "figure": figure,
    }


def _classify_patches(steps: Steps, c_vars: Any, images: jax.Array, located: Mapping[str, np.ndarray],
                      keep: np.ndarray, patch_batch: int, num_classes: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Summed patch softmaxes (B, C), the top patch's softmax (B, C) and valid patches per image (B,).

    The valid patches of each branch's images are classified as a flat list in chunks of ``patch_batch``
    (the last chunk padded with copies of its first patch, whose results are dropped).
    """
    branch, boxes, valid = located["branch"], located["boxes"], located["valid"] & keep[:, None]
    summed = np.zeros((len(branch), num_classes), np.float32)
    top = np.zeros_like(summed)
    for j, rf in enumerate(RECEPTIVE_FIELDS):
        img, slot = np.nonzero(valid & (branch == j)[:, None])
        for lo in range(0, len(img), patch_batch):
            n = min(patch_batch, len(img) - lo)
            take = np.concatenate([np.arange(lo, lo + n), np.full(patch_batch - n, lo)])
            probs = np.asarray(steps.patches[rf](c_vars, images, img[take].astype(np.int32),
                                                 boxes[img[take], slot[take]]))[:n]
            np.add.at(summed, img[lo:lo + n], probs)
            first = slot[lo:lo + n] == 0
            top[img[lo:lo + n][first]] = probs[first]
    return summed, top, valid.sum(axis=1)


def _check_pair(anchornet: Trained, classifier: Trained) -> None:
    if anchornet.config.model != "anchornet":
        raise ValueError(f"--workdir must be an AnchorNet workdir, but it trained {anchornet.config.model!r}: "
                         "train one with python train.py --config configs/anchornet_demo.py --workdir DIR")
    if classifier.config.model == "anchornet":
        raise ValueError("--downstream must be a classifier workdir (a BagNet or ResNet-50), not an AnchorNet: "
                         "train one with python train.py --config configs/demo.py --workdir DIR2")
    if tuple(anchornet.class_names) != tuple(classifier.class_names):
        raise ValueError(f"the classifier's {len(classifier.class_names)} classes differ from AnchorNet's "
                         f"{len(anchornet.class_names)}: train both workdirs on the same dataset")


def _figure_data(batch: Mapping[str, np.ndarray], outputs: Mapping[str, Any], located: Mapping[str, Any],
                 keep: np.ndarray, n: int) -> dict[str, Any]:
    """The first ``n`` kept images with their boxes per setting and attention maps, for the figures."""
    rows = np.nonzero(keep)[0][:n]
    return {
        "images": np.asarray(batch["image"])[rows],
        "labels": np.asarray(batch["label"])[rows],
        "attention": {rf: np.asarray(outputs["attention"][rf])[rows] for rf in RECEPTIVE_FIELDS},
        "located": {name: {k: np.asarray(v)[rows] for k, v in loc.items()} for name, loc in located.items()},
    }


# ----------------------------------------------------------------------------------------------- report
def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else float("nan")


def result_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Table 3 and Table 4 rows (one dict each, also the CSV): accuracies, images, patches, GFLOPs per image."""
    im, inputs = result["images"], result["inputs"]
    f_a, f_c = result["anchornet_flops"], result["classifier_flops"]
    n = len(im["label"])
    rows = [
        {"table": "3", "method": "full image", "branch": "all", "classifier_input": inputs.full, "images": n,
         "patches_per_image": float("nan"), "top1": _mean(im["full_top1"]), "top5": _mean(im["full_top5"]),
         "classifier_gflops": f_c[inputs.full] / 1e9, "total_gflops": f_c[inputs.full] / 1e9},
        {"table": "3", "method": "AnchorNet (Eq. 7)", "branch": "all", "classifier_input": 0, "images": n,
         "patches_per_image": float("nan"), "top1": _mean(im["anchornet_top1"]),
         "top5": _mean(im["anchornet_top5"]), "classifier_gflops": 0.0, "total_gflops": f_a / 1e9},
    ]
    for name in result["settings"]:
        for j, rf in enumerate((*RECEPTIVE_FIELDS, None)):
            sel = np.ones(n, bool) if rf is None else im["branch"] == j
            if rf is None:  # the weighted average over branches: each image at its own branch's input size
                classify = sum(float(im[f"{name}_patches"][im["branch"] == k].sum()) * f_c[inputs.patch[r]]
                               for k, r in enumerate(RECEPTIVE_FIELDS)) / n
            else:
                classify = _mean(im[f"{name}_patches"][sel]) * f_c[inputs.patch[rf]]
            rows.append({"table": "3", "method": f"LSP {name}", "branch": "all" if rf is None else f"B{rf}",
                         "classifier_input": 0 if rf is None else inputs.patch[rf], "images": int(sel.sum()),
                         "patches_per_image": _mean(im[f"{name}_patches"][sel]), "top1": _mean(im[f"{name}_top1"][sel]),
                         "top5": _mean(im[f"{name}_top5"][sel]), "classifier_gflops": classify / 1e9,
                         "total_gflops": (f_a + classify) / 1e9 if sel.any() else float("nan")})
    for j, rf in enumerate(RECEPTIVE_FIELDS):
        sel = im["branch"] == j
        for kind, extra in (("R", 0.0), ("L", f_a)):
            rows.append({"table": "4", "method": f"{rf}^2-{kind}", "branch": f"B{rf}",
                         "classifier_input": inputs.patch[rf], "images": int(sel.sum()),
                         "patches_per_image": 1.0, "top1": _mean(im[f"{kind}_top1"][sel]),
                         "top5": _mean(im[f"{kind}_top5"][sel]), "classifier_gflops": f_c[inputs.patch[rf]] / 1e9,
                         "total_gflops": (extra + f_c[inputs.patch[rf]]) / 1e9})
    return rows


def _fmt(x: float, digits: int = 4) -> str:
    return "–" if x != x else f"{x:.{digits}f}"


def _gflops(x: float) -> str:
    return "–" if x != x else f"{x:.3g}"


def lsp_markdown(rows: Sequence[dict[str, Any]], result: Mapping[str, Any], title: str) -> str:
    """Table 3 (patches vs full image) and Table 4 (-R vs -L) of the AnchorNet paper, as Markdown."""
    inputs, n = result["inputs"], len(result["images"]["label"])
    t3 = [r for r in rows if r["table"] == "3"]
    t4 = [r for r in rows if r["table"] == "4"]
    side = ("resized to the classifier's training size" if inputs.mode == "resize" else
            "fed at theta px" if inputs.scale == 1.0 else f"fed at {inputs.scale:g} x theta px (--input-scale)")
    table3 = report.markdown_table(
        ["method", "branch", "classifier input", "images", "patches / image", "top-1", "top-5",
         "classifier GFLOPs / image", "total GFLOPs / image (+AnchorNet)"],
        [[r["method"], r["branch"], f"{r['classifier_input']}²" if r["classifier_input"] else "–", r["images"],
          _fmt(r["patches_per_image"], 2), _fmt(r["top1"]), _fmt(r["top5"]), _gflops(r["classifier_gflops"]),
          _gflops(r["total_gflops"])] for r in t3])
    table4 = report.markdown_table(
        ["scale", "branch", "images", "top-1", "top-5", "total GFLOPs / image"],
        [[r["method"], r["branch"], r["images"], _fmt(r["top1"]), _fmt(r["top5"]), _gflops(r["total_gflops"])]
         for r in t4])
    return (f"## LSP and downstream classification: {title}\n\n"
            f"{n} eval images at {result['anchornet_size']} px; AnchorNet "
            f"{_gflops(result['anchornet_flops'] / 1e9)} GFLOPs / image. Patches and rescaled images are {side} "
            f"({inputs.patch[63]}/{inputs.patch[95]}/{inputs.patch[111]} px for theta = 63/95/111), the full image "
            f"at {inputs.full} px. GFLOPs are XLA's (a multiply-add counts 2). Localized in "
            f"{result['seconds']:.1f} s ({n / result['seconds']:.1f} images/s, compilation included).\n\n"
            "### Table 3: semantic patches for classification\n\n"
            "Each image is localized by the branch AnchorNet picks (Eq. 6-8); its class is the argmax of the "
            "softmaxes summed over its patches. `all` is the average over every image. Classifier GFLOPs "
            "count the patches only (the paper's Table 3); total adds AnchorNet.\n\n" + table3 +
            "\n### Table 4: rescaling (-R) vs localizing (-L)\n\n"
            "Per branch, over the images AnchorNet assigned to it: -L classifies the top patch only, -R the "
            "whole image rescaled to theta x theta px. No fine-tuning.\n\n" + table4)


def _pixels(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC eval images as [0, 1] RGB for display."""
    return np.asarray(images, np.float32) / 255.0



def plot_patches(result: Mapping[str, Any], class_names: Sequence[str], path: str | pathlib.Path) -> None:
    """Figure 3: each image with its localized patches (one column per setting), coloured by branch."""
    plt = report.pyplot()
    from matplotlib.patches import Rectangle

    fig_data = result["figure"]
    images, labels = _pixels(fig_data["images"]), fig_data["labels"]
    settings = list(fig_data["located"])
    fig, axes = plt.subplots(len(images), len(settings), figsize=(3.2 * len(settings), 3.2 * len(images)),
                             squeeze=False)
    for i, image in enumerate(images):
        for s, name in enumerate(settings):
            loc = fig_data["located"][name]
            rf = RECEPTIVE_FIELDS[int(loc["branch"][i])]
            ax = axes[i, s]
            ax.imshow(image)
            for (y0, x0, y1, x1), ok in zip(loc["boxes"][i], loc["valid"][i]):
                if ok:
                    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.5,
                                           edgecolor=BRANCH_COLORS[rf]))
            ax.set_title(f"{name}: B{rf}, {int(loc['valid'][i].sum())} patches\ntrue {class_names[labels[i]]} / "
                         f"γ {class_names[int(loc['cls'][i])]}", fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_attention(result: Mapping[str, Any], path: str | pathlib.Path) -> None:
    """Figure 5: each image and the spatial attention S (Eq. 5) of the three branches over it.

    Location (i, j) of branch theta is drawn over the centre of its patch, ``8 * (i, j) + theta / 2``.
    """
    plt = report.pyplot()
    fig_data = result["figure"]
    images = _pixels(fig_data["images"])
    fig, axes = plt.subplots(len(images), 1 + len(RECEPTIVE_FIELDS), figsize=(12, 3 * len(images)), squeeze=False)
    for i, image in enumerate(images):
        axes[i, 0].imshow(image)
        axes[i, 0].set_title("image", fontsize=8)
        for j, rf in enumerate(RECEPTIVE_FIELDS):
            att = fig_data["attention"][rf][i]
            gh, gw = att.shape
            ax = axes[i, j + 1]
            ax.imshow(image)
            ax.imshow(att, cmap="jet", alpha=0.5, interpolation="bilinear",
                      extent=(rf / 2 - 4, 8 * (gw - 1) + rf / 2 + 4, 8 * (gh - 1) + rf / 2 + 4, rf / 2 - 4))
            ax.set_xlim(-0.5, image.shape[1] - 0.5)
            ax.set_ylim(image.shape[0] - 0.5, -0.5)
            ax.set_title(f"attention S of B{rf} ({gh}x{gw})", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bagjax.experiments.lsp", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="an AnchorNet training workdir")
    p.add_argument("--downstream", required=True, help="a classifier training workdir (BagNet or ResNet-50)")
    p.add_argument("--setting", choices=(*SETTINGS, "both"), default="both",
                   help="LSP parameters of section 4.1 (visualization: K=5/3/2, T=0.3; slack: K=24/10/8, T=0.8)")
    p.add_argument("--patch-input", choices=PATCH_INPUTS, default="native",
                   help="native: theta px patches, full image at its size (the paper); resize: every classifier "
                        "input at the classifier's training size")
    p.add_argument("--input-scale", type=float, default=1.0,
                   help="native only: resize every classifier input by this factor, for a classifier trained at "
                        "another pixel scale (the demos: 0.5)")
    p.add_argument("--max-examples", type=int, help="evaluate only the first N eval examples")
    p.add_argument("--batch-size", type=int, help="images per AnchorNet batch (default: its eval_batch_size)")
    p.add_argument("--patch-batch", type=int, default=256, help="patches per classifier call")
    p.add_argument("--figure-images", type=int, default=FIGURE_IMAGES, help="images in the PNG figures (0: none)")
    p.add_argument("--out", help="output directory (default: WORKDIR/lsp)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    out = pathlib.Path(args.out or pathlib.Path(args.workdir) / "lsp")
    anchornet, classifier = load_trained(args.workdir), load_trained(args.downstream)
    settings = tuple(SETTINGS) if args.setting == "both" else (args.setting,)
    result = run_lsp(anchornet, classifier, settings=settings, patch_input=args.patch_input,
                     input_scale=args.input_scale,
                     max_examples=args.max_examples, batch_size=args.batch_size, patch_batch=args.patch_batch,
                     figure_images=args.figure_images)
    out.mkdir(parents=True, exist_ok=True)
    rows = result_rows(result)
    title = f"AnchorNet {args.workdir} -> {classifier.config.model} {args.downstream}"
    markdown = lsp_markdown(rows, result, title)
    (out / "lsp.md").write_text(markdown)
    report.write_csv(out / "lsp.csv", rows)
    written = ["lsp.md", "lsp.csv"]
    if result["figure"]:
        plot_patches(result, anchornet.class_names, out / "lsp_patches.png")
        plot_attention(result, out / "lsp_attention.png")
        written += ["lsp_patches.png", "lsp_attention.png"]
    print(markdown)
    print(f"lsp: wrote {', '.join(written)} to {out}", flush=True)
    return result


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
