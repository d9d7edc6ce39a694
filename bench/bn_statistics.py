"""Eval-mode accuracy against batch-statistics accuracy of a trained workdir: do its BatchNorm statistics
describe its weights?

Eval mode uses the checkpoint's running statistics; "batch statistics" normalizes each eval batch by its own
mean and variance (train-mode BatchNorm, nothing stored). Both are measured on the same images: every eval
batch without padding (bagjax.training.precise_bn.guard over the whole split). A ratio far above 1 means the
running statistics lag the weights (README, Troubleshooting: eval accuracy far below train accuracy).

    python bench/bn_statistics.py --workdir runs/demo

The last line is `bn_statistics: R.RRx (batch-statistics accuracy over eval-mode accuracy)`.
"""
from __future__ import annotations

import functools
import json
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT)]

import jax
import ml_collections

from bagjax import cli
from bagjax.errors import PathNotFoundError
from bagjax.training import checkpoints, precise_bn
from bagjax.training.loop import eval_logits
from bagjax.training.state import TrainState
from bagjax.workdir import load_trained


def check_step(workdir: str, step: int) -> None:
    """A one-line error for a ``--step`` the workdir has no checkpoint of (orbax's is a long traceback)."""
    if not checkpoints.is_workdir(workdir):
        return  # load_trained says what a workdir is
    with checkpoints.quiet_orbax():
        ckpt = checkpoints.Checkpoints(workdir, read_only=True)
        saved = ckpt.all_steps()
        ckpt.close()
    if step not in saved:
        raise PathNotFoundError(f"--step {step}: {workdir} has no checkpoint of that step (saved: "
                                f"{', '.join(map(str, saved)) or 'none'}): give one of those, or leave --step out "
                                "for the best")


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
    args = parser.parse_args()
    if args.step is not None:
        check_step(args.workdir, args.step)
    trained = load_trained(args.workdir, args.step)
    cli.check_workdir_dataset(trained.config, args.workdir)
    config = ml_collections.ConfigDict(trained.config.to_dict())
    config.precise_bn = ml_collections.ConfigDict({"num_batches": 0, "guard_batches": 10**9})  # all full batches
    num_eval = json.loads((pathlib.Path(args.workdir) / "dataset.json").read_text())["num_eval"]
    step = jax.jit(functools.partial(precise_bn.guard_step, model=trained.model,
                                     logits_fn=functools.partial(eval_logits, config.model)))
    state = TrainState(step=0, params=trained.variables["params"], batch_stats=trained.variables["batch_stats"],
                       opt_state=None)
    metrics = precise_bn.guard(step, state, precise_bn.guard_batches(config, num_eval))
    print(f"| workdir | images | eval mode | batch statistics |\n|---|---|---|---|\n"
          f"| {args.workdir} | {metrics['guard_count']} | {metrics['guard_eval_accuracy']:.1%} | "
          f"{metrics['guard_batch_stats_accuracy']:.1%} |")
    ratio = metrics["guard_batch_stats_accuracy"] / max(metrics["guard_eval_accuracy"], 1e-9)
    print(f"bn_statistics: {ratio:.2f}x (batch-statistics accuracy over eval-mode accuracy)")


if __name__ == "__main__":
    cli.run_main(main)
