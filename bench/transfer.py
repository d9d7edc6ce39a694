"""Fine-tuning with the folder recipe against the same recipe from scratch and scikit-learn, on few images.

Pretrain: the folder recipe from scratch on the digits 0-4 (32 px PNGs of scikit-learn's digits, the 0-4 of a
seeded 1,400 / 397 split). Target: the digits 5-9, 20 images per class to train on and every other 5-9 digit to
evaluate. On the target, in one run: the recipe from scratch, full fine-tuning and head-only fine-tuning (on cached
features) of the pretrained workdir (``configs/folder.py:TARGET,init_from=PRETRAINED[,head_only]``), and
``LogisticRegression`` and an RBF ``SVC`` on the raw pixels.

    python bench/transfer.py
    python bench/transfer.py --budget 0.5   # half the epochs in every run

The last line is `transfer: R.RRx (full fine-tuning's error rate over from-scratch's; lower is better)`.
"""
from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests"), str(REPO_ROOT / "bench")]

import baselines
import benchargs
import digits
from bagjax import cli


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=20, help="target train images per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=1.0, help="the recipe's compute budget for every run "
                        "(configs/folder.py:PATH,budget=F)")
    parser.add_argument("--keep", default="", help="keep the workdirs in this directory (default: a temporary one)")
    parser.add_argument("--pretrained", default="", help="a workdir of the recipe on the digits 0-4 to fine-tune "
                        "instead of pretraining here (e.g. KEEP/pretrain of an earlier run)")
    args = parser.parse_args()
    benchargs.at_least(parser, args, per_class=1, seed=0)
    benchargs.positive(parser, args, "budget")
    if args.per_class > 150:
        parser.error(f"--per-class must be at most 150 (the rest evaluates), got {args.per_class}")
    root = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="bench_transfer_"))
    seed = f"--config.seed={args.seed}"
    budget = f",budget={args.budget:g}" if args.budget != 1 else ""
    try:
        train, evaluate = digits.digits_split(seed=args.seed)
        source = digits.write_split_folder(root / "digits0-4", train, evaluate, classes=range(5))
        target = digits.write_split_folder(root / "digits5-9", *digits.few_shot_split(range(5, 10), args.per_class,
                                                                                      args.seed))
        runs = {}
        pretrained = pathlib.Path(args.pretrained) if args.pretrained else root / "pretrain"
        if not args.pretrained:
            runs["pretrain (0-4, from scratch)"] = baselines.train(f"folder.py:{source}{budget}", pretrained, seed)
        runs["from scratch"] = baselines.train(f"folder.py:{target}{budget}", root / "scratch", seed)
        runs["full fine-tuning"] = baselines.train(f"folder.py:{target},init_from={pretrained}{budget}", root / "full",
                                                   seed)
        runs["head only (cached features)"] = baselines.train(
            f"folder.py:{target},init_from={pretrained},head_only{budget}", root / "head", seed)
        base = baselines.classical(target)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    for run in runs.values():
        print(run["recipe"])
    print("| model | eval accuracy | eval mode / batch stats (guard) | wall time |\n|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['eval_accuracy']:.2%} ({int(r['eval_count'])} images) | {r['guard_eval_accuracy']:.1%} / "
              f"{r['guard_batch_stats_accuracy']:.1%} | {r['seconds']:.0f} s |")
    for name, accuracy in base.items():
        print(f"| {name} (pixels) | {accuracy:.2%} | | |")
    error = {k: 1 - r["eval_accuracy"] for k, r in runs.items()}
    print(f"transfer: {error['full fine-tuning'] / max(error['from scratch'], 1e-9):.2f}x "
          "(full fine-tuning's error rate over from-scratch's; lower is better)")


if __name__ == "__main__":
    cli.run_main(main)
