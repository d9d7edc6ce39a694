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
The computation is in ``bagjax.downstream``; this module writes its tables and figures.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the eval pipeline uses tf.data; keep its logs quiet

from bagjax import atomic, cli  # noqa: E402

if __name__ == "__main__":
    cli.exit_on_signals()  # first: a Ctrl-C while jax loads ends in one line too

import argparse  # noqa: E402
import pathlib  # noqa: E402
from typing import Any, Mapping, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from bagjax.downstream import FIGURE_IMAGES, PATCH_INPUTS, SETTINGS, run_lsp  # noqa: E402
from bagjax.experiments import report  # noqa: E402
from bagjax.models.anchornet import RECEPTIVE_FIELDS  # noqa: E402
from bagjax.workdir import load_trained  # noqa: E402
from bagjax.errors import UserError  # noqa: E402

BRANCH_COLORS = {63: "#e41a1c", 95: "#377eb8", 111: "#4daf4a"}  # boxes in lsp_patches.png


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
    report.save_figure(fig, path, dpi=100)


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
    report.save_figure(fig, path, dpi=100)


# ----------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m bagjax.experiments.lsp", description=__doc__.split("\n\n")[0])
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
    if args.figure_images < 0:
        raise UserError(f"--figure-images must be 0 (no figures) or more, got {args.figure_images}")
    out = cli.check_output_dir(args.out or pathlib.Path(args.workdir) / "lsp")
    anchornet, classifier = load_trained(args.workdir), load_trained(args.downstream)
    cli.check_workdir_dataset(anchornet.config, args.workdir)
    settings = tuple(SETTINGS) if args.setting == "both" else (args.setting,)
    result = run_lsp(anchornet, classifier, settings=settings, patch_input=args.patch_input,
                     input_scale=args.input_scale,
                     max_examples=args.max_examples, batch_size=args.batch_size, patch_batch=args.patch_batch,
                     figure_images=args.figure_images)
    out.mkdir(parents=True, exist_ok=True)
    rows = result_rows(result)
    title = f"AnchorNet {args.workdir} -> {classifier.config.model} {args.downstream}"
    markdown = lsp_markdown(rows, result, title)
    atomic.write_text(out / "lsp.md", markdown)
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
    cli.run_main(main)
