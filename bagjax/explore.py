"""The evidence explorer: one self-contained HTML page per workdir, in which a person clicks through the evidence.

    python -m bagjax.explore --workdir W IMAGE|FOLDER [...] [--out W/explore.html] [--stride 1]
    python -m bagjax.explore --workdir W --split validation --max-examples 32

The page opens from the file system with no server and no network (its Content-Security-Policy forbids any
request): the images (PNG/JPEG), the model's outputs (float16 in base64) and the script (``assets/explore.js``,
vanilla JS) are inline. Per image it shows the top-k predictions and, for any embedded class, its evidence map
with a colour scale symmetric around 0; a hovered location's patch box and top classes; the most evident
patches. What the page shows depends on what the model computes (no model names):

- **BagNets** (Brendel & Bethge 2019): the map is the patch logits at native stride, or the exact stride-1 map
  (``bagjax.interpret.stride1_heatmap``) with ``--stride 1``. Since the image logits are the plain mean of the
  patch logits (section 3), the page recomputes the prediction exactly for a blackout slider (Zou et al.,
  section 5: the mean over the kept patches, ``bagjax.blackout.kept_patch_logits``) that keeps the top x % of
  patches for the predicted class, a random x %, or removes the top x %. PatchGuard robust masking (Xiang et
  al. 2021) is computed by ``bagjax.robust`` here and embedded: certified or not at each patch size, and the
  window that masking removes.
- **AnchorNet** (Yang et al.): the three branches' class maps F^j, the branch rule's class and branch
  (Eq. 6-8, ``bagjax.localize.branch_decision``) and the LSP patches (Algorithm 1).
- **Other models** (ResNet-50): class activation maps (Zhou et al. 2016), the classifier head applied at every
  location of the last feature map; for a linear head their mean is the image logits.

Which classes are embedded: all of them up to ``--max-classes``. Beyond that, for a BagNet, every class that can
win some blackout (a class c can win a kept set only if its largest patch logit reaches the largest smallest
patch logit of any class, as the mean over kept patches lies between the two), so the in-browser argmax is still
over every possible winner; the page says when this cap cut some of them.

Quantisation: float16 keeps 11 significant bits, so each value is off by at most ``max|x| * 2**-11 + 2**-25``
(the ``bound`` stored with every map). An image whose float16 patch logits would move the page's argmax away
from bagjax's is embedded in float32 instead, so the page's prediction equals bagjax's on every image.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import heapq
import html
import io
import json
import math
import os
import pathlib
import sys
from collections.abc import Iterable, Sequence
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from PIL import Image  # noqa: E402

from bagjax import blackout, cli, data, interpret, patches, robust  # noqa: E402
from bagjax.errors import UserError  # noqa: E402
from bagjax.workdir import Trained, load_trained  # noqa: E402

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
TOP_K = 5
MAX_CLASSES = 48  # 32 BagNet-33 images at 224 px stay under 4 MB (docs/explore.md)
PATCH_AREAS = (0.01, 0.02, 0.03)  # PatchGuard's patch sizes: 1 %, 2 % and 3 % of the image (32 px = 2 % at 224)
FLOAT16_BITS = 11  # significand bits of float16: relative rounding error at most 2**-11


@dataclasses.dataclass(frozen=True)
class Example:
    """One image to explore: eval-preprocessed uint8 pixels, a name, and the label when it is known."""

    name: str
    pixels: np.ndarray
    label: int | None = None


# ----------------------------------------------------------------------------------------------- encoding
def encode_image(pixels: np.ndarray) -> str:
    """A ``data:`` URL of uint8 HWC pixels: PNG (lossless) below 128 px, JPEG (quality 90) above, for size."""
    buffer = io.BytesIO()
    image = Image.fromarray(np.asarray(pixels, np.uint8))
    if min(image.size) < 128:
        image.save(buffer, format="PNG", optimize=True)
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def float16_bound(values: np.ndarray) -> float:
    """Largest error of rounding ``values`` to float16: half an ulp of the largest, ``max|x| * 2**-11 + 2**-25``."""
    return float(np.max(np.abs(values), initial=0.0)) * 2.0**-FLOAT16_BITS + 2.0**-25


def encode_array(values: np.ndarray, dtype: str = "float16") -> dict[str, Any]:
    """``{'dtype', 'shape', 'data' (little-endian base64), 'bound'}``: float16 unless it overflows, or float32."""
    values = np.asarray(values, np.float32)
    if dtype == "float16" and np.max(np.abs(values), initial=0.0) >= 65504:
        dtype = "float32"
    stored = values.astype("<f2" if dtype == "float16" else "<f4")
    bound = float16_bound(values) if dtype == "float16" else 0.0
    return {"dtype": dtype, "shape": list(values.shape), "bound": bound,
            "data": base64.b64encode(stored.tobytes()).decode("ascii")}


def decode_array(encoded: dict[str, Any]) -> np.ndarray:
    """The float32 values an ``encode_array`` record holds (what the page decodes)."""
    dtype = "<f2" if encoded["dtype"] == "float16" else "<f4"
    return np.frombuffer(base64.b64decode(encoded["data"]), dtype).astype(np.float32).reshape(encoded["shape"])


def colormap_lut(name: str = "RdBu_r") -> list[list[int]]:
    """256 RGB entries of a matplotlib colour map: the page colours maps as ``interpret.plot_heatmap`` does."""
    rgb = matplotlib.colormaps[name](np.linspace(0.0, 1.0, 256))[:, :3]
    return np.round(rgb * 255).astype(int).tolist()


# ----------------------------------------------------------------------------------------------- classes
def possible_winners(patch_logits: np.ndarray) -> np.ndarray:
    """Bool ``(C,)``: classes that win the kept-patch mean of SOME nonempty set of patches of ``(H', W', C)``.

    Over a kept set the mean of class c lies in ``[min_p L[p, c], max_p L[p, c]]``, so c can only beat every
    other class when ``max_p L[p, c] >= max_d min_p L[p, d]``. A superset: every true winner passes.
    """
    flat = patch_logits.reshape(-1, patch_logits.shape[-1])
    return flat.max(axis=0) >= flat.min(axis=0).max()


def embedded_classes(logits: np.ndarray, patch_logits: np.ndarray | None, max_classes: int) -> tuple[np.ndarray, bool]:
    """Sorted class ids to embed for one image and whether a possible blackout winner was left out.

    All classes when they fit ``max_classes``; else the top-k and, for BagNets, the possible winners ranked by
    image logit, cut at ``max_classes``.
    """
    num_classes = logits.shape[-1]
    if num_classes <= max_classes:
        return np.arange(num_classes), False
    order = np.argsort(-logits, kind="stable")
    if patch_logits is None:
        return np.sort(order[:max_classes]), False
    winners = possible_winners(patch_logits)
    ranked = [*order[:TOP_K], *(c for c in order[TOP_K:] if winners[c])]  # past the top-k: possible winners only
    return np.sort(ranked[:max_classes]), len(ranked) > max_classes


def _mean_argmax(encoded: dict[str, Any], classes: np.ndarray) -> int:
    """The class the page predicts from an embedded BagNet map with every patch kept (its float64 mean)."""
    values = decode_array(encoded).astype(np.float64)
    return int(classes[np.argmax(values.reshape(-1, values.shape[-1]).mean(axis=0))])


# ----------------------------------------------------------------------------------------------- model outputs
def model_kind(trained: Trained, image_size: int) -> str:
    """``'bagnet'`` (patch logits), ``'anchornet'`` (branch outputs, a dict) or ``'cam'`` (feature maps + head).

    Decided by the model's contracts (DESIGN.md): BagNets have patch geometry; AnchorNet returns a dict.
    """
    try:
        patches.receptive_field(trained.model)
        return "bagnet"
    except UserError:  # no bounded receptive field
        pass
    probe = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    outputs = jax.eval_shape(lambda x: trained.model.apply(trained.variables, x, train=False), probe)
    return "anchornet" if isinstance(outputs, dict) else "cam"


def image_logits(trained: Trained, kind: str, variables: Any, images: jax.Array) -> jax.Array:
    """``(B, C)`` float32 image logits as bagjax predicts with them (``predict``, the eval metrics)."""
    model = trained.model
    if kind == "bagnet":  # a Clipped BagNet's logits are the mean of phi(patch logits)
        return robust.apply_model(model, variables, images, trained.config, train=False).astype(jnp.float32)
    outputs = model.apply(variables, images, train=False)
    if kind == "anchornet":
        from bagjax.models import anchornet

        return anchornet.image_logits(outputs)
    return outputs.astype(jnp.float32)


def forward_fn(trained: Trained, kind: str):
    """A jitted ``uint8 images -> dict`` of image logits and the maps the page shows (plus AnchorNet's rule)."""
    model, config = trained.model, trained.config

    def forward(variables: Any, pixels: jax.Array) -> dict[str, Any]:
        images = data.normalize(pixels)
        logits = image_logits(trained, kind, variables, images)
        if kind == "bagnet":
            raw = model.apply(variables, images, train=False, method="patch_logits").astype(jnp.float32)
            clip = robust.config_clip(config)
            evidence = robust.parse_clip(clip).fn(raw) if clip else raw
            return {"logits": logits, "maps": [evidence], "raw": raw}
        if kind == "anchornet":
            from bagjax import localize
            from bagjax.models.anchornet import RECEPTIVE_FIELDS

            outputs = model.apply(variables, images, train=False)
            found = localize.localize_patches(outputs, localize.LSP_VISUALIZATION)
            maps = [outputs["class_maps"][rf].astype(jnp.float32) for rf in RECEPTIVE_FIELDS]
            return {"logits": logits, "maps": maps, "rule": found,
                    "branch_logits": jnp.stack([outputs["logits"][rf] for rf in RECEPTIVE_FIELDS], 1)}
        features = model.apply(variables, images, train=False, method="features")
        return {"logits": logits, "maps": [blackout.head_function(model, variables)(features).astype(jnp.float32)]}

    return jax.jit(forward)


def map_names(kind: str) -> list[str]:
    """The names of ``forward_fn``'s maps, in order."""
    if kind == "anchornet":
        from bagjax.models.anchornet import RECEPTIVE_FIELDS

        return [f"branch {rf}" for rf in RECEPTIVE_FIELDS]
    return ["patch logits"] if kind == "bagnet" else ["CAM"]


def map_geometry(trained: Trained, kind: str, name: str) -> dict[str, Any]:
    """Where a map's location (i, j) looks: ``rf``/``stride`` boxes for BagNets and AnchorNet branches, else None."""
    if kind == "bagnet":
        rf, stride = patches.receptive_field(trained.model)
        return {"rf": rf, "stride": stride}
    if kind == "anchornet":
        from bagjax.models.anchornet import STRIDE

        return {"rf": int(name.split()[-1]), "stride": STRIDE}
    return {"rf": None, "stride": None}  # a CAM location's field is most of the image: no box


def patch_sizes(image_size: int) -> list[int]:
    """PatchGuard's square patches of 1 %, 2 % and 3 % of a ``image_size`` px image (at least 1 px, distinct)."""
    return sorted({max(1, round(image_size * math.sqrt(a))) for a in PATCH_AREAS})


@functools.partial(jax.jit, static_argnums=1)
def _masking(raw: jax.Array, window: tuple[int, int]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PatchGuard robust masking of one image: masked prediction, its certificate, the window masking removes."""
    prediction = jnp.argmax(robust.defended_logits(raw, "mask", window))
    certified = robust.certify(raw[None], prediction[None], "mask", window)["certified"][0]
    return prediction, certified, robust.masked_window(raw, window, prediction)


def robustness(trained: Trained, raw: np.ndarray, height: int, width: int, sizes: Sequence[int]) -> list[dict]:
    """PatchGuard robust masking (``bagjax.robust``) of one image at each patch size: certified, window, its box.

    Certified means no patch of that size anywhere changes the masked prediction (``robust.certify`` with that
    prediction as the label); ``box`` is the pixel box of the window masking removes for the predicted class.
    """
    boxes = patches.patch_boxes(trained.model, height, width)
    out = []
    for size in sizes:
        window = robust.window_shape(trained.model, size, height, width)
        prediction, certified, (a, b) = jax.device_get(_masking(jnp.asarray(raw), window))
        a, b = int(a), int(b)
        first, last = boxes[a, b], boxes[a + window[0] - 1, b + window[1] - 1]
        out.append({"patch": int(size), "window": list(window), "prediction": int(prediction),
                    "certified": bool(certified), "start": [a, b],
                    "box": [int(first[0]), int(first[1]), int(min(last[2], height)), int(min(last[3], width))]})
    return out


def image_records(trained: Trained, kind: str, examples: Sequence[Example], *, max_classes: int = MAX_CLASSES,
                  stride: int = 0, batch_size: int = 16, progress: bool = True) -> list[dict[str, Any]]:
    """Everything the page shows about each example (see the module docstring), in order."""
    forward = forward_fn(trained, kind)
    records = []
    bar = tqdm.tqdm(total=len(examples), desc="explore", unit="img", dynamic_ncols=True, disable=not progress)
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        pixels = np.stack([e.pixels for e in chunk])
        out = jax.device_get(forward(trained.variables, jnp.asarray(pixels)))
        for k, example in enumerate(chunk):
            records.append(_record(trained, kind, example, jax.tree.map(lambda v: v[k], out), max_classes, stride))
            bar.update(1)
    bar.close()
    return records


def _record(trained: Trained, kind: str, example: Example, out: dict[str, Any], max_classes: int,
            stride: int) -> dict[str, Any]:
    height, width = example.pixels.shape[:2]
    logits = np.asarray(out["logits"], np.float32)
    probs = np.asarray(jax.nn.softmax(logits))
    prediction = int(np.argmax(logits))
    evidence = out["maps"][0] if kind == "bagnet" else None
    classes, cut = embedded_classes(logits, evidence, max_classes)
    top = np.argsort(-probs, kind="stable")[:TOP_K]
    record: dict[str, Any] = {
        "name": example.name, "image": encode_image(example.pixels), "height": height, "width": width,
        "label": example.label, "prediction": prediction, "classes": classes.tolist(), "cut": cut,
        "top": [[int(c), float(probs[c]), float(logits[c])] for c in top], "maps": []}
    for name, values in zip(map_names(kind), out["maps"]):
        values = np.asarray(values, np.float32)[..., classes]
        encoded = encode_array(values)
        if kind == "bagnet" and _mean_argmax(encoded, classes) != prediction:
            encoded = encode_array(values, "float32")  # a near tie float16 would move: keep it exact
        record["maps"].append({"name": name, "values": encoded,
                               **map_geometry(trained, kind, name)})
    if kind == "bagnet":
        record["robust"] = robustness(trained, out["raw"], height, width, patch_sizes(min(height, width)))
        if stride == 1:
            wanted = [int(c) for c in top[:3]]
            image = np.asarray(data.normalize(example.pixels))
            maps = interpret.stride1_heatmap(trained.model, trained.variables,
                                             np.repeat(image[None], len(wanted), 0), np.asarray(wanted))
            record["stride1"] = {str(c): encode_array(np.asarray(m)) for c, m in zip(wanted, maps)}
    if kind == "anchornet":
        from bagjax.models.anchornet import RECEPTIVE_FIELDS

        rule = out["rule"]
        branch_probs = np.asarray(jax.nn.softmax(out["branch_logits"], axis=-1))
        record["rule"] = {
            "class": int(rule["cls"]), "branch": int(rule["branch"]), "patch": int(rule["patch_size"]),
            "boxes": [[int(v) for v in box] for box, ok in zip(rule["boxes"], rule["valid"]) if ok],
            "branches": [{"rf": rf, "class": int(np.argmax(p)), "confidence": float(np.max(p))}
                         for rf, p in zip(RECEPTIVE_FIELDS, branch_probs)]}
    return record


# ----------------------------------------------------------------------------------------------- inputs
def file_examples(trained: Trained, paths: Sequence[str]) -> list[Example]:
    """Image files (and folders of them) preprocessed as ``bagjax.predict`` does; unreadable ones are skipped."""
    from bagjax.predict import image_files, preprocess

    examples = []
    for path in image_files(list(paths)):
        try:
            examples.append(Example(path, preprocess(path, trained.config)))
        except (ValueError, OSError) as e:
            print(f"{path}: skipped ({e})", file=sys.stderr)
    return examples


def split_examples(trained: Trained, kind: str, split: str, max_examples: int, *, progress: bool = True
                   ) -> tuple[list[Example], dict[str, Any]]:
    """Evaluate a whole split: the ``max_examples`` to embed (misclassified first, then the least confident) and
    the dataset view's figures (labels and predictions of every example, for accuracy and the confusion matrix)."""
    forward = jax.jit(lambda v, x: image_logits(trained, kind, v, data.normalize(x)))
    labels, predictions = [], []
    worst: list[tuple[float, int, np.ndarray, int]] = []  # min-heap of (badness, -index, ...): keeps the worst
    bar = tqdm.tqdm(desc=f"evaluate {split}", unit="img", dynamic_ncols=True, disable=not progress)
    for batch in data.eval_batches(trained.config, split=split, process_index=0, process_count=1):
        logits = np.asarray(forward(trained.variables, jnp.asarray(batch["image"])))
        probs = np.asarray(jax.nn.softmax(logits))
        for image, label, valid, p in zip(batch["image"], batch["label"], batch["mask"], probs):
            if not valid:
                continue
            index, prediction = len(labels), int(np.argmax(p))
            labels.append(int(label))
            predictions.append(prediction)
            badness = (prediction != int(label)) + (1.0 - float(p.max()))  # wrong > 1 > any right one
            item = (badness, -index, image, int(label))
            if len(worst) < max_examples:
                heapq.heappush(worst, item)
            elif item[:2] > worst[0][:2]:
                heapq.heapreplace(worst, item)
            bar.update(1)
    bar.close()
    if not labels:
        raise UserError(f"split {split!r} of {trained.config.dataset} has no examples: choose another --split")
    chosen = sorted(worst, key=lambda t: (-t[0], -t[1]))
    examples = [Example(f"{split} #{-neg}", image, label) for _, neg, image, label in chosen]
    return examples, {"split": split, "labels": labels, "predictions": predictions}


# ----------------------------------------------------------------------------------------------- the page
def page_data(trained: Trained, kind: str, records: list[dict[str, Any]], dataset: dict[str, Any] | None,
              stride: int) -> dict[str, Any]:
    """What the page's script reads (``assets/explore.js``): the model, class names, colour map, images, dataset."""
    return {"model": trained.config.model, "kind": kind, "classNames": list(trained.class_names),
            "stride": stride, "colormap": colormap_lut(), "images": records, "dataset": dataset,
            "seed": 0}


def render_page(payload: dict[str, Any], title: str) -> str:
    """The HTML text: the template with the data (JSON, with ``</`` escaped) and the script inline."""
    template = (ASSETS / "explore.html").read_text()
    script = (ASSETS / "explore.js").read_text()
    blob = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return (template.replace("{{TITLE}}", html.escape(title))
            .replace("{{DATA}}", blob)
            .replace("{{SCRIPT}}", script.replace("</script", "<\\/script")))


def write_atomic(path: pathlib.Path, text: str) -> None:
    """Write via a temporary name and rename, so a reader never sees half a page and a failure loses nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def explore(workdir: str | os.PathLike, images: Iterable[str] = (), *, out: str | os.PathLike | None = None,
            split: str | None = None, max_examples: int = 32, stride: int = 0, max_classes: int = MAX_CLASSES,
            trained: Trained | None = None, examples: Sequence[Example] | None = None,
            progress: bool = True) -> pathlib.Path:
    """Write the explorer page for a workdir and return its path (default ``WORKDIR/explore.html``).

    The images are files/folders, a split's worst ``max_examples``, or ready ``examples`` (train.py's eval
    images). ``stride=1`` adds exact stride-1 maps of the top 3 classes (BagNets).
    """
    trained = load_trained(workdir) if trained is None else trained
    out = pathlib.Path(out) if out else pathlib.Path(workdir) / "explore.html"
    if out.is_dir():
        raise UserError(f"--out {out} is a directory: give the path of the .html file to write")
    if stride not in (0, 1):
        raise UserError(f"--stride must be 1 (exact per-pixel maps) or left out (native stride), got {stride}")
    kind = model_kind(trained, int(trained.config.image_size))
    if stride == 1 and kind != "bagnet":
        raise UserError(f"--stride 1 maps need a BagNet; {trained.config.model} has no patch logits: leave out "
                        "--stride")
    dataset = None
    chosen = list(examples or [])
    if split:
        found, dataset = split_examples(trained, kind, split, max_examples, progress=progress)
        chosen += found
    if images:
        chosen += file_examples(trained, list(images))
    if not chosen:
        raise UserError("nothing to explore: give image files or folders, or --split validation")
    records = image_records(trained, kind, chosen, max_classes=max_classes, stride=stride, progress=progress)
    payload = page_data(trained, kind, records, dataset, stride)
    write_atomic(out, render_page(payload, f"bagjax explorer: {pathlib.Path(workdir).name}"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m bagjax.explore",
                                description="One self-contained HTML page to click through a model's evidence.")
    parser.add_argument("--workdir", required=True, help="a training workdir (python train.py ... --workdir)")
    parser.add_argument("images", nargs="*", help="image files (JPEG, PNG, ...) or folders of them")
    parser.add_argument("--out", help="the page to write (default: WORKDIR/explore.html)")
    parser.add_argument("--split", help="explore this split of the workdir's dataset (e.g. validation)")
    parser.add_argument("--max-examples", type=int, default=32,
                        help="--split: embed this many, misclassified and least confident first (default 32)")
    parser.add_argument("--stride", type=int, default=0, help="1: exact stride-1 BagNet maps of the top 3 classes")
    parser.add_argument("--max-classes", type=int, default=MAX_CLASSES,
                        help=f"classes embedded per image when there are more (default {MAX_CLASSES})")
    args = parser.parse_args(argv)
    if args.max_examples < 1 or args.max_classes < TOP_K:
        parser.error(f"--max-examples must be at least 1 and --max-classes at least {TOP_K}")
    if not args.images and not args.split:
        parser.error("give image files or folders, or --split validation")
    path = explore(args.workdir, args.images, out=args.out, split=args.split, max_examples=args.max_examples,
                   stride=args.stride, max_classes=args.max_classes)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB): open it in a browser")


if __name__ == "__main__":
    cli.run_main(main)
