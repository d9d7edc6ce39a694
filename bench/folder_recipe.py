"""The folder recipe from scratch against scikit-learn's classical classifiers on the same images.

scikit-learn's 1,797 handwritten digits as 32 px PNGs (nearest upscaling of the 8x8 originals, tests/digits.py),
a seeded 1,400 / 397 split; ``configs/folder.py:FOLDER`` trained as a user runs it, ``LogisticRegression`` and
an RBF ``SVC`` on the raw pixels of the same PNGs. Per seed (the split's and the training's): eval accuracy,
eval mode against batch statistics, wall time.

    python bench/folder_recipe.py --seeds 0 1 2
    python bench/folder_recipe.py --seeds 0 1 2 --budget 0.5   # what tests/test_recipes.py trains

The last line is `folder_recipe: R.RRx (bagjax error rate over SVC's; lower is better)`, mean error rates over
the seeds.
"""
from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests"), str(REPO_ROOT / "bench")]

import numpy as np

import baselines
import benchargs
import digits
from bagjax import cli


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="split and training seeds")
    parser.add_argument("--num-train", type=int, default=1400, help="train images (the rest of 1,797 evaluate)")
    parser.add_argument("--budget", type=float, default=1.0, help="the recipe's compute budget (configs/folder.py:"
                        "PATH,budget=F)")
    args = parser.parse_args()
    benchargs.at_least(parser, args, seeds=0, num_train=10)
    benchargs.positive(parser, args, "budget")
    if args.num_train > 1787:
        parser.error(f"--num-train must be at most 1787 (10 eval images), got {args.num_train}")
    rows = []
    root = pathlib.Path(tempfile.mkdtemp(prefix="bench_folder_recipe_"))
    try:
        for seed in args.seeds:
            train, evaluate = digits.digits_split(args.num_train, seed)
            folder = digits.write_split_folder(root / f"digits{seed}", train, evaluate)
            base = baselines.classical(folder)
            budget = f",budget={args.budget:g}" if args.budget != 1 else ""
            run = baselines.train(f"folder.py:{folder}{budget}", root / f"run{seed}", f"--config.seed={seed}")
            rows.append({"seed": seed, **base, "bagjax": run["eval_accuracy"], "eval mode": run["guard_eval_accuracy"],
                         "batch stats": run["guard_batch_stats_accuracy"], "seconds": run["seconds"]})
            print(run["recipe"], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("| seed | bagjax folder recipe | logistic regression | SVC (RBF) | eval mode / batch stats (guard) | "
          "wall time |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['bagjax']:.2%} | {r['logistic regression']:.2%} | {r['SVC (RBF)']:.2%} | "
              f"{r['eval mode']:.1%} / {r['batch stats']:.1%} | {r['seconds']:.0f} s |")
    error = {k: float(np.mean([1 - r[k] for r in rows])) for k in ("bagjax", "logistic regression", "SVC (RBF)")}
    print(f"mean error rate: bagjax {error['bagjax']:.2%}, logistic regression {error['logistic regression']:.2%}, "
          f"SVC {error['SVC (RBF)']:.2%}")
    print(f"folder_recipe: {error['bagjax'] / max(error['SVC (RBF)'], 1e-9):.2f}x "
          "(bagjax error rate over SVC's; lower is better)")


if __name__ == "__main__":
    cli.run_main(main)
