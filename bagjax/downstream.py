"""AnchorNet's semantic patches for a downstream classifier, the computation (Yang et al., sections 3.3 and 4.3).

For every image of an AnchorNet workdir's eval split: the branch decision and LSP (``bagjax.localize``), the
classifier on the full image, on the localized patches (cropped by ``gather_patches``) and on the image rescaled
to theta x theta, and the FLOPs of each by XLA's cost analysis. ``bagjax.experiments.lsp`` describes the
procedure and the ``--patch-input`` / ``--input-scale`` choices (``Inputs``), and writes the tables and figures.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from bagjax import data
from bagjax.localize import LSP_SLACK, LSP_VISUALIZATION, LSPSettings, crop_patches, localize_patches
from bagjax.models.anchornet import RECEPTIVE_FIELDS
from bagjax.workdir import Trained
from bagjax.errors import UserError

SETTINGS: dict[str, Mapping[int, LSPSettings]] = {"visualization": LSP_VISUALIZATION, "slack": LSP_SLACK}
PATCH_INPUTS = ("native", "resize")
FIGURE_IMAGES = 6


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
            raise UserError(f"--input-scale must be a positive number, got {scale}")
        if mode == "resize":
            if scale != 1.0:
                raise UserError("--input-scale applies to --patch-input native only (resize feeds every input "
                                "at the classifier's training size); drop one of them")
            return Inputs(mode, classifier_size, {rf: classifier_size for rf in RECEPTIVE_FIELDS})
        if mode == "native":
            patch = {rf: max(1, round(rf * scale)) for rf in RECEPTIVE_FIELDS}
            return Inputs(mode, max(1, round(anchornet_size * scale)), patch, scale)
        raise UserError(f"unknown --patch-input {mode!r}: choose one of {', '.join(PATCH_INPUTS)}")


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
        raise UserError(f"unknown LSP setting(s) {bad}: choose from {', '.join(SETTINGS)}")
    if max_examples is not None and max_examples < 1:
        raise UserError(f"--max-examples must be at least 1, got {max_examples}")
    if patch_batch < 1:
        raise UserError(f"--patch-batch must be at least 1, got {patch_batch}")
    config = anchornet.config.copy_and_resolve_references()
    if batch_size is not None:
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        config.eval_batch_size = batch_size
    size = int(config.image_size)
    inputs = Inputs.make(patch_input, size, int(classifier.config.image_size), input_scale)
    smallest, rf = min(inputs.full, *inputs.patch.values()), getattr(classifier.model, "receptive_field", 1)
    if smallest < rf:
        raise UserError(f"--input-scale {input_scale:g} gives {smallest} px classifier inputs, below "
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
        raise UserError("the eval split is empty: check the AnchorNet workdir's config.data.eval_split")
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
        raise UserError(f"--workdir must be an AnchorNet workdir, but it trained {anchornet.config.model!r}: "
                        "train one with python train.py --config configs/anchornet_demo.py --workdir DIR")
    if classifier.config.model == "anchornet":
        raise UserError("--downstream must be a classifier workdir (a BagNet or ResNet-50), not an AnchorNet: "
                        "train one with python train.py --config configs/demo.py --workdir DIR2")
    if tuple(anchornet.class_names) != tuple(classifier.class_names):
        raise UserError(f"the classifier's {len(classifier.class_names)} classes differ from AnchorNet's "
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
