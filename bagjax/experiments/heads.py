"""Learned vs fixed classifier heads on the same backbone (Qian 2020, thesis chapter 3; Tables 5.1-5.5).

    python -m bagjax.experiments.heads --config configs/demo.py --workdir DIR [--seeds 1]
        [--heads learned,orthogonal,orthogonal_hoffer,hadamard,identity] [--config.KEY=VALUE ...]

Trains the config's backbone once per head and seed in ``DIR/<head>_seed<k>/`` with
``bagjax.training.loop.train_and_evaluate`` (a finished run is resumed, i.e. only re-evaluated), then writes
the thesis-style table: top-1 accuracy (mean ± std over seeds), the gap to the learned head, the number of
trainable parameters and the savings in % of the learned model's parameters. That definition is ours: thesis
Table 5.5 has a SAVINGS column but does not define it, and its values do not follow from parameter counts
(ResNet-50's 102-class head is 0.9 % of its parameters; the table says 5.10 %).
The fixed heads' matrices are constants, not parameters (bagjax.models.heads), so they count as saved.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
from typing import Any, Sequence

from bagjax import atomic, cli

if __name__ == "__main__":
    cli.exit_on_signals()  # first: a Ctrl-C while jax loads ends in one line too

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from bagjax.errors import UserError  # noqa: E402
from bagjax.experiments import report  # noqa: E402
from bagjax.models import HEADS  # noqa: E402

HEAD_LABELS = {"learned": "Learned", "orthogonal": "Fixed Orthogonal",
               "orthogonal_hoffer": "Fixed Orthogonal (Hoffer)", "hadamard": "Fixed Hadamard",
               "identity": "Fixed Identity"}


def run_config(config: ml_collections.ConfigDict, head: str, seed: int) -> ml_collections.ConfigDict:
    """A copy of ``config`` with ``head`` and ``seed`` overridden (the base config is left untouched)."""
    run = config.copy_and_resolve_references()
    run.unlock()
    run.head = head
    run.seed = seed
    return run


def parameter_counts(config: ml_collections.ConfigDict, num_classes: int) -> tuple[int, int]:
    """(all trainable parameters, head parameters) of a config's model, from shapes only (nothing is compiled)."""
    from bagjax.models import build_model

    model = build_model(config, num_classes)
    x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    shapes = jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))["params"]
    total = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    head = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes.get("head", {})))
    return total, head


def check_heads(heads: Sequence[str], seeds: int) -> list[str]:
    """The ``--heads`` list without blanks, checked: at least one, each known and given once; ``seeds >= 1``."""
    heads = [h.strip() for h in heads if h.strip()]
    if not heads:
        raise UserError(f"give at least one head, e.g. --heads=learned,identity (from {', '.join(HEADS)})")
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise UserError(f"unknown head(s) {', '.join(unknown)}: choose from {', '.join(HEADS)}")
    twice = list(dict.fromkeys(h for h in heads if heads.count(h) > 1))
    if twice:
        raise UserError(f"--heads lists {', '.join(twice)} twice: give each head once (--seeds=N trains N seeds "
                        "of each)")
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    return heads


def run_heads(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, heads: Sequence[str],
              seeds: int) -> list[dict[str, Any]]:
    """Train (or resume/re-evaluate) every head x seed; one row per run with its eval metrics and sizes.

    Every head is checked against the config first (its model's shapes, with nothing compiled), so that a head
    the model does not support fails before anything trains.
    """
    from bagjax import data
    from bagjax.training.loop import train_and_evaluate

    heads = check_heads(heads, seeds)
    info = data.dataset_info(config)
    num_classes = info.num_classes if config.num_classes <= 0 else config.num_classes
    sizes = {head: parameter_counts(run_config(config, head, config.seed), num_classes)
             for head in dict.fromkeys([*heads, "learned"])}
    rows = []
    for head in heads:
        params, head_params = sizes[head]
        for k in range(seeds):
            seed = config.seed + k
            subdir = pathlib.Path(workdir) / f"{head}_seed{seed}"
            print(f"== head {head}, seed {seed}: {subdir}", flush=True)
            start = time.perf_counter()
            metrics = train_and_evaluate(run_config(config, head, seed), str(subdir))
            if metrics.get("preempted"):  # the loop saved a checkpoint; the shell sees the signal
                cli.stopped(metrics["signal"], f"{subdir} saved a checkpoint at its current step: rerun the same "
                            "command to resume")
            rows.append({"head": head, "seed": seed, "accuracy": metrics["eval_accuracy"],
                         "loss": metrics["eval_loss"], "examples": metrics["eval_count"], "params": params,
                         "head_params": head_params, "seconds": time.perf_counter() - start,
                         "workdir": str(subdir)})
    learned_params = sizes["learned"][0]
    for r in rows:
        r["savings_percent"] = 100.0 * (learned_params - r["params"]) / learned_params
    return rows


def heads_markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
    """Thesis Tables 5.1-5.5: accuracy, gap to learned, parameters and savings per head."""
    heads = list(dict.fromkeys(r["head"] for r in rows))
    acc = {h: [r["accuracy"] for r in rows if r["head"] == h] for h in heads}
    first = {h: next(r for r in rows if r["head"] == h) for h in heads}
    learned = report.mean_std(acc["learned"])[0] if "learned" in acc else None
    table_rows = []
    for h in heads:
        gap = "N/A" if h == "learned" or learned is None else \
            f"{100 * (report.mean_std(acc[h])[0] - learned):+.2f}%"
        table_rows.append([HEAD_LABELS[h], report.format_mean_std(acc[h], digits=2, scale=100, suffix="%"), gap,
                           report.format_mean_std([r["loss"] for r in rows if r["head"] == h]),
                           f"{first[h]['params']:,}", f"{first[h]['head_params']:,}",
                           f"{first[h]['savings_percent']:.2f}%", len(acc[h])])
    table = report.markdown_table(["Classifier", "Top-1 accuracy", "Performance gap", "Eval cross-entropy",
                                   "Parameters", "Head parameters", "Savings", "Seeds"], table_rows)
    return (f"## Classifier heads: {title}\n\n{first[heads[0]]['examples']} eval examples; accuracy is the mean "
            "± std over seeds; the gap is to the learned head; savings are the share of the learned model's "
            "trainable parameters that a head does not need (our definition: the thesis's Table 5.5 leaves its "
            "SAVINGS column undefined).\n\n" + table)


def plot_heads(rows: Sequence[dict[str, Any]], path: str | pathlib.Path, title: str) -> None:
    """Bar chart of top-1 accuracy per head (error bars: std over seeds), annotated with parameter savings."""
    plt = report.pyplot()
    heads = list(dict.fromkeys(r["head"] for r in rows))
    stats = [report.mean_std([r["accuracy"] for r in rows if r["head"] == h]) for h in heads]
    savings = [next(r["savings_percent"] for r in rows if r["head"] == h) for h in heads]
    fig, ax = plt.subplots(figsize=(1.8 * len(heads) + 2, 4))
    bars = ax.bar([HEAD_LABELS[h] for h in heads], [100 * m for m, _ in stats],
                  yerr=[100 * s for _, s in stats], capsize=4, color="tab:blue")
    for bar, s in zip(bars, savings):
        ax.annotate(f"saves {s:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel("eval top-1 accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    fig.tight_layout()
    report.save_figure(fig, path, dpi=120)


def write_report(rows: Sequence[dict[str, Any]], out: str | pathlib.Path, title: str) -> str:
    """heads.md, heads.csv and heads.png in ``out``; returns the Markdown."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    markdown = heads_markdown(rows, title)
    atomic.write_text(out / "heads.md", markdown)
    report.write_csv(out / "heads.csv", rows)
    plot_heads(rows, out / "heads.png", title)
    return markdown


def define_flags(flag_values=None):
    """This command's absl flags, on ``flag_values`` (absl's global ``FLAGS`` by default); returns them."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    cli.define_config_flags(flag_values, "Directory that holds one training run per head and seed.")
    flags.DEFINE_string("out", None, "Where heads.md/.csv/.png go (default: the workdir).", flag_values=flag_values)
    flags.DEFINE_integer("seeds", 1, "Seeds per head: config.seed, config.seed + 1, ...", flag_values=flag_values)
    flags.DEFINE_list("heads", list(HEADS), f"Comma-separated heads among {', '.join(HEADS)}.",
                      flag_values=flag_values)
    return flag_values


def main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    flags_ = flags.FLAGS
    logging.set_verbosity(logging.WARNING)
    config = flags_.config
    cli.check_output_dir(flags_.workdir, "--workdir")
    out = cli.check_output_dir(flags_.out or flags_.workdir, "--out" if flags_.out else "--workdir")
    start = time.perf_counter()
    rows = run_heads(config, flags_.workdir, flags_.heads, flags_.seeds)
    title = f"{config.model} on {config.dataset}"
    markdown = write_report(rows, out, title)
    print(markdown)
    print(f"heads: {len(rows)} run(s) in {time.perf_counter() - start:.1f} s; wrote heads.md, heads.csv, heads.png "
          f"in {flags_.out or flags_.workdir}", flush=True)


def run() -> None:
    """absl's flag errors are multi-line; turn a bad flag into one actionable line (as train.py does)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the input pipeline uses tf.data
    from absl import app

    if cli.wants_help(sys.argv):
        print(cli.help_text("python -m bagjax.experiments.heads --config configs/NAME.py[:smoke] --workdir DIR "
                            "[--heads=a,b] [--seeds=N] [--out DIR] [--config.KEY=VALUE ...]", __doc__.splitlines()[0],
                            (("--config=configs/NAME.py[:smoke]", "the base config (required)"),
                             ("--workdir=DIR", "one training run per head and seed under it (required)"),
                             ("--heads=learned,identity,...", f"heads among {', '.join(HEADS)}"),
                             ("--seeds=N", "seeds per head (config.seed, config.seed + 1, ...)"),
                             ("--out=DIR", "where heads.md/.csv/.png go (default: the workdir)"))))
        return
    cli.exit_on_signals()
    flags_ = define_flags()
    with cli.user_errors():
        cli.parse_config_flags(flags_, sys.argv, "--heads=learned,identity, not --heads learned identity")
        app.run(main, argv=[sys.argv[0]])


if __name__ == "__main__":
    run()
