"""Classify image files with a trained workdir and draw where the evidence is.

    python -m bagjax.predict --workdir runs/demo IMAGE|FOLDER [...] [--out DIR] [--stride1]

Prints the top-5 classes with probabilities for each image and writes ``<out>/<image stem>_heatmap.png``
(``<stem>-2_heatmap.png`` for a second image of that stem): the evidence map of the top class. For a BagNet
that is its patch logits (Brendel & Bethge 2019, Fig. 2) at native stride, or with ``--stride1`` the exact
per-pixel map of the reference's ``generate_heatmap_pytorch``; for an identity-head model the class's feature
channel (Qian 2020, thesis 3.4).
"""

from __future__ import annotations

import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bagjax import cli, data, interpret  # noqa: E402
from bagjax.models import is_bagnet  # noqa: E402
from bagjax.workdir import load_trained  # noqa: E402
from bagjax.errors import PathNotWritableError, UserError  # noqa: E402


def preprocess(path: str, config) -> np.ndarray:
    """The eval preprocessing of the workdir's dataset, for one file: uint8 (JPEG draft mode for large photos)."""
    from bagjax.data.preprocess import open_image, resize_full

    if not os.path.isfile(path):
        raise UserError(f"unreadable image {path}: no such file")
    image = open_image(path)
    if config.dataset.startswith("synthetic"):
        return resize_full(image, config.image_size)
    return data.preprocess_for_eval(image, config.image_size, config.data.crop_fraction)


def image_files(paths: list[str]) -> list[str]:
    """The files to classify: a directory stands for its images (sorted; the extensions imagefolder reads)."""
    from bagjax.data.sources import IMAGE_EXTENSIONS

    files = []
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            continue
        found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            print(f"{path}: skipped (a directory without {'/'.join(IMAGE_EXTENSIONS)} files)", file=sys.stderr)
        files += found
    return files


def evidence_map(trained, image: np.ndarray, cls: int, stride1: bool) -> np.ndarray | None:
    """The top class's evidence map, or None for a model that has none."""
    model, variables = trained.model, trained.variables
    if is_bagnet(trained.config.model):
        if stride1:
            return np.asarray(interpret.stride1_heatmap(model, variables, image, cls))
        return np.asarray(interpret.class_evidence(model, variables, image[None], cls)[0])
    if trained.config.head == "identity":
        return np.asarray(interpret.class_activation_map(model, variables, image[None], cls)[0])
    return None


def predict(workdir: str, images: list[str], out: str | None = None, stride1: bool = False) -> list[list[tuple[str, float]]]:
    """Top-5 (class name, probability) per image; writes one heatmap PNG per image into ``out``."""
    trained = load_trained(workdir)
    out_dir = pathlib.Path(out or pathlib.Path(workdir) / "predictions")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file: give a directory for the heatmaps")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_test.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PathNotWritableError(f"cannot write heatmaps to {out_dir} ({e.strerror}): pass --out DIR, a writable "
                                   "directory") from None
    apply = jax.jit(lambda v, x: trained.model.apply(v, x, train=False))
    normalize = jax.jit(data.normalize)  # uint8 to the device, normalized there
    results = []
    stems: dict[str, int] = {}
    for path in image_files(images):
        try:
            pixels = preprocess(path, trained.config)
        except (ValueError, OSError) as e:
            print(f"{path}: skipped ({e})", file=sys.stderr)
            continue
        image = normalize(pixels)
        outputs = apply(trained.variables, image[None])
        if isinstance(outputs, dict):  # AnchorNet
            from bagjax.models.anchornet import image_logits

            outputs = image_logits(outputs)
        probs = np.asarray(jax.nn.softmax(outputs[0]))
        top = np.argsort(-probs)[:5]
        ranked = [(trained.class_names[i], float(probs[i])) for i in top]
        results.append(ranked)
        print(f"{path}:")
        for name, p in ranked:
            print(f"  {p:7.2%}  {name}")
        heatmap = evidence_map(trained, image, int(top[0]), stride1)
        if heatmap is not None:
            stem = pathlib.Path(path).stem
            stems[stem] = stems.get(stem, 0) + 1  # a.png and other/a.png: a_heatmap.png and a-2_heatmap.png
            target = out_dir / f"{stem}{'' if stems[stem] == 1 else f'-{stems[stem]}'}_heatmap.png"
            interpret.save_heatmap_figure(target, pixels[None], heatmap[None], [f"evidence for {ranked[0][0]}"])
            print(f"  heatmap: {target}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(prog="python -m bagjax.predict",
                                description="Top-5 classes and an evidence heatmap per image.")
    parser.add_argument("--workdir", required=True, help="a training workdir (python train.py ... --workdir)")
    parser.add_argument("--out", help="where the heatmap PNGs go (default: WORKDIR/predictions)")
    parser.add_argument("--stride1", action="store_true", help="exact per-pixel BagNet heatmap (slower)")
    parser.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...) or folders of them")
    args = parser.parse_args(argv)
    with cli.user_errors():  # missing or damaged workdir files, an unwritable --out
        results = predict(args.workdir, args.images, args.out, args.stride1)
    if not results:
        sys.exit("error: none of the images could be read (see above)")


if __name__ == "__main__":
    main()
