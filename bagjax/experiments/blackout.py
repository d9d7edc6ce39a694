"""Patch "blackout" tables, plots and command line (Zou, Yan & Liu, sections 5-6, Table 1).

    python -m bagjax.experiments.blackout --workdir DIR [--split SPLIT] [--out DIR] [--seeds 5]
                                          [--mode patches|channels] [--max-examples N] [--compute-table]

The paper's Table 1 reports the test split; ``--split`` picks it (e.g. ``train[90%:]``, the test slice of the
tf_flowers config); the default is the workdir's eval split. The masks, the evaluation and the FLOP accounting
are in ``bagjax.blackout``, whose docstring gives the two modes and why.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the eval pipeline uses tf.data; keep its logs quiet

from bagjax import atomic, cli  # noqa: E402

if __name__ == "__main__":
    cli.exit_on_signals()  # first: a Ctrl-C while jax loads ends in one line too

import argparse  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bagjax.blackout import (COMPUTE_KEEPS, COMPUTE_MODELS, MODES, PAPER_DROPS, SWEEP_KEEPS,  # noqa: E402
                             compute_table, make_schemes, run_blackout)
from bagjax.models import receptive_field  # noqa: E402
from bagjax.experiments import report  # noqa: E402
from bagjax.errors import UserError  # noqa: E402


# ----------------------------------------------------------------------------------------------- report
def _grouped(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["policy"], r["keep_fraction"]), []).append(r)
    return groups


def _cell(group: list[dict[str, Any]], key: str) -> str:
    return report.format_mean_std([r[key] for r in group])


def blackout_markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
    """Table 1 of the blackout paper (schemes as columns) and the keep-fraction sweep (random vs top-evidence)."""
    groups = _grouped(rows)
    mode, units = rows[0]["mode"], rows[0]["units"]
    unit = "patches" if mode == "patches" else "channels"
    seeds = len(groups.get(("random", round(1 - PAPER_DROPS[0], 6)), []))
    columns = [("No blackout", groups[("none", 1.0)]), ('Alternating "blackout"', groups[("alternating", 0.5)])]
    columns += [(f'Random {round(d * 100)}% "blackout"', groups[("random", round(1 - d, 6))]) for d in PAPER_DROPS]
    table1 = report.markdown_table(
        ["", *[name for name, _ in columns]],
        [[f"Kept {unit}", *[f"{g[0]['kept']} / {units}" for _, g in columns]],
         ["Eval accuracy", *[_cell(g, "accuracy") for _, g in columns]],
         ["Eval cross-entropy", *[_cell(g, "loss") for _, g in columns]]])
    keeps = sorted({k for p, k in groups if p == "random"})
    sweep = report.markdown_table(
        ["kept fraction", f"kept {unit}", "random accuracy", "random cross-entropy", "top-evidence accuracy",
         "top-evidence cross-entropy"],
        [[f"{k:.2f}", groups[("random", k)][0]["kept"], _cell(groups[("random", k)], "accuracy"),
          _cell(groups[("random", k)], "loss"), _cell(groups[("top", k)], "accuracy"),
          _cell(groups[("top", k)], "loss")] for k in keeps])
    return (f"## Blackout, mode `{mode}`: {title}\n\n"
            f"{rows[0]['examples']} examples of split `{rows[0]['split']}`, {units} {unit} per image; random "
            f"schemes: mean ± std over {seeds} seed(s); random p% = p% of the {unit} dropped. Shaped like Table 1 "
            "of Zou, Yan & Liu:\n\n"
            f"{table1}\n"
            f"### Keep-fraction sweep (at least one of the {units} {unit} kept)\n\n"
            "Top-evidence keeps the units with the largest contribution to the unmasked model's predicted "
            "class; it peeks at the model's own evidence.\n\n" + sweep)


def plot_blackout(rows: Sequence[dict[str, Any]], path: str | pathlib.Path, title: str) -> None:
    """Accuracy and cross-entropy against the dropped fraction: random (± std), top-evidence, alternating."""
    plt = report.pyplot()
    groups = _grouped(rows)
    none = groups[("none", 1.0)][0]
    keeps = sorted({k for p, k in groups if p == "random"}, reverse=True)  # ascending dropped fraction
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    units = none["units"]
    drops = [0.0] + [1.0 - groups[("random", k)][0]["kept"] / units for k in keeps]  # as actually dropped
    alternating = groups[("alternating", 0.5)][0]
    for ax, key, label in zip(axes, ("accuracy", "loss"), ("accuracy", "cross-entropy")):
        stats = [(none[key], 0.0)] + [report.mean_std([r[key] for r in groups[("random", k)]]) for k in keeps]
        mean, std = np.array([m for m, _ in stats]), np.array([s for _, s in stats])
        ax.plot(drops, mean, "o-", ms=3, label="random")
        ax.fill_between(drops, mean - std, mean + std, alpha=0.25)
        ax.plot(drops, [none[key]] + [groups[("top", k)][0][key] for k in keeps], "s-", ms=3,
                label="top-evidence (peeks)")
        ax.plot([1.0 - alternating["kept"] / units], [alternating[key]], "D", ms=8, label="alternating")
        ax.set_xlabel(f"dropped fraction of {'patches' if none['mode'] == 'patches' else 'channels'}")
        ax.set_ylabel(f"eval {label}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    report.save_figure(fig, path, dpi=120)


def compute_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The compute table: where evaluating only the kept patches saves FLOPs and time, and where it cannot."""
    device = jax.devices()[0]
    table = report.markdown_table(
        ["model", "kept fraction", "kept patches", "dense GFLOPs", "sparse GFLOPs", "sparse / dense FLOPs",
         "break-even kept fraction", "dense ms", "sparse ms", "sparse / dense time"],
        [[r["model"], f"{r['keep_fraction']:.2f}", f"{r['kept']} / {r['patches']}", f"{r['dense_gflops']:.2f}",
          f"{r['sparse_gflops']:.2f}", f"{r['flops_ratio']:.3f}x", f"{r['break_even_keep']:.3f}",
          f"{r['dense_ms']:.1f}", f"{r['sparse_ms']:.1f}", f"{r['time_ratio']:.3f}x"] for r in rows])
    r0 = rows[0]
    return (f"## Sparse (kept patches only) vs dense evaluation\n\n"
            f"Random weights, {r0['batch']} image(s) of {r0['image_size']} px, {device.platform} "
            f"({device.device_kind}); FLOPs from XLA's cost analysis, time the best of repeated jitted calls. "
            "Sparse evaluation runs `bagjax.patches.per_patch_logits` on the kept patches only; it saves compute "
            "only below the break-even kept fraction, because overlapping patches share no work.\n\n" + table)


# ----------------------------------------------------------------------------------------------- CLI
def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m bagjax.experiments.blackout", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="a BagNet training workdir (python train.py ... --workdir DIR)")
    p.add_argument("--split", help="the split to evaluate, e.g. test or train[90%%:] (default: the workdir's "
                   "eval split; the paper's Table 1 is on the test split)")
    p.add_argument("--out", help="output directory (default: WORKDIR/blackout)")
    p.add_argument("--seeds", type=int, default=5, help="seeds of every random scheme (mean ± std)")
    p.add_argument("--mode", choices=MODES, default="patches",
                   help="patches: mean over kept patches (paper text); channels: zeroed fc columns (paper code)")
    p.add_argument("--max-examples", type=int, help="evaluate only the first N eval examples")
    p.add_argument("--keeps", type=_floats, default=list(SWEEP_KEEPS),
                   help="kept fractions of the sweep, comma-separated, in [0, 1) (0 keeps one unit)")
    p.add_argument("--compute-table", action="store_true",
                   help="also measure sparse vs dense FLOPs and time of BagNet-9/17/33 (random weights)")
    p.add_argument("--compute-keeps", type=_floats, default=list(COMPUTE_KEEPS),
                   help="kept fractions of the compute table, comma-separated, in [0, 1]")
    p.add_argument("--compute-image-size", type=int, default=224, help="image side of the compute table, in px")
    p.add_argument("--compute-batch", type=int, default=1, help="images per call of the compute table")
    args = p.parse_args(argv)
    if not args.workdir and not args.compute_table:
        p.error("give --workdir DIR (blackout of a trained BagNet) and/or --compute-table")
    if not args.workdir and not args.out:
        p.error("--compute-table without --workdir needs --out DIR")
    return args


def check_args(args: argparse.Namespace) -> list:
    """Every argument checked before anything is loaded or computed; returns the blackout schemes."""
    schemes = make_schemes(args.seeds, args.keeps) if args.workdir else []
    if args.max_examples is not None and args.max_examples < 1:
        raise UserError(f"--max-examples must be at least 1, got {args.max_examples}")
    if args.compute_table:
        if not args.compute_keeps:
            raise UserError("give at least one --compute-keeps fraction in [0, 1], e.g. --compute-keeps 0,0.25,1")
        bad = [k for k in args.compute_keeps if not 0.0 <= k <= 1.0]
        if bad:
            raise UserError(f"--compute-keeps must lie in [0, 1], got {bad}")
        if args.compute_batch < 1:
            raise UserError(f"--compute-batch must be at least 1 image, got {args.compute_batch}")
        rf = max(receptive_field(name)[0] for name in COMPUTE_MODELS)
        if args.compute_image_size < rf:
            raise UserError(f"--compute-image-size must be at least {rf} px (BagNet-33's receptive field), got "
                            f"{args.compute_image_size}")
    return schemes


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    schemes = check_args(args)
    out = cli.check_output_dir(args.out or pathlib.Path(args.workdir) / "blackout")
    if args.workdir:
        from bagjax.workdir import load_trained

        trained = load_trained(args.workdir)  # first: a mistyped --workdir must not get a blackout/ folder
        cli.check_workdir_dataset(trained.config, args.workdir)
        start = time.perf_counter()
        rows = run_blackout(trained.model, trained.variables, trained.config, schemes, mode=args.mode,
                            max_examples=args.max_examples, split=args.split)
        title = f"{trained.config.model}, head `{trained.config.head}`, {args.workdir}"
        out.mkdir(parents=True, exist_ok=True)
        markdown = blackout_markdown(rows, title)
        atomic.write_text(out / "blackout.md", markdown)
        report.write_csv(out / "blackout.csv", rows)
        plot_blackout(rows, out / "blackout.png", f"Blackout ({args.mode}): {trained.config.model}")
        print(markdown)
        print(f"blackout: {len(schemes)} schemes in {time.perf_counter() - start:.1f} s; wrote "
              f"{out / 'blackout.md'}, blackout.csv, blackout.png", flush=True)
    if args.compute_table:
        rows = compute_table(keeps=args.compute_keeps, image_size=args.compute_image_size,
                             batch=args.compute_batch)
        markdown = compute_markdown(rows)
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(out / "compute.md", markdown)
        report.write_csv(out / "compute.csv", rows)
        print(markdown)
        print(f"wrote {out / 'compute.md'} and compute.csv", flush=True)


if __name__ == "__main__":
    cli.run_main(main)
