"""Range checks of every config value, run before anything is written to the workdir or compiled.

Each check raises ``ValueError`` with one line that names the key, the value, and a value that works, so a
typo in an override (``--config.batch_size=-8``) never touches a workdir's ``config.json`` or checkpoints.
Checks that need the model or the devices stay in ``loop.check_config``; these need only the config.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import ml_collections

from bagjax.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")


def _fail(key: str, value: Any, need: str, example: Any) -> None:
    raise UserError(f"{key}={value!r} {need}: e.g. --config.{key}={example}")


def _positive_int(config: ml_collections.ConfigDict, key: str, example: Any) -> None:
    value = _get(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        _fail(key, value, "must be a positive integer", example)


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def _in_range(config: ml_collections.ConfigDict, key: str, low: float, high: float, *, low_open: bool = False,
              high_open: bool = False, example: Any) -> None:
    value = _get(config, key)
    ok = isinstance(value, (int, float)) and math.isfinite(value) and \
        (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if ok:
        return
    if high == math.inf:
        _fail(key, value, f"must be {'>' if low_open else '>='} {low}", example)
    _fail(key, value, f"must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}", example)


def check_workdir_arg(workdir: str | None) -> None:
    """An empty ``--workdir=`` would train into the current directory, and a workdir's own ``checkpoints/``
    (a slip of tab completion) would start a second run inside the first one's checkpoint folder."""
    if not workdir or not str(workdir).strip():
        raise UserError("--workdir is empty: give the directory for checkpoints and metrics, e.g. --workdir runs/demo")
    path = pathlib.Path(workdir).expanduser().resolve()
    if path.name == "checkpoints" and _is_bagjax_config(path.parent / "config.json"):
        raise UserError(f"--workdir {workdir} is the checkpoints/ folder of the workdir {path.parent}: "
                        f"use --workdir {path.parent} to resume that run, or a new directory for a new one")


def _is_bagjax_config(path: pathlib.Path) -> bool:
    """Whether ``path`` is a config.json that train.py wrote (not any project's config.json)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and {"model", "dataset", "optimizer", "precise_bn"} <= saved.keys()


def check_values(config: ml_collections.ConfigDict) -> None:
    """Ranges and positivity of every numeric key and the choices of the string keys (no I/O, no JAX)."""
    for key, example in (("batch_size", 64), ("eval_batch_size", 64), ("log_every_steps", 50),
                         ("checkpoint_every_steps", 1000), ("keep_checkpoints", 2), ("image_size", 224)):
        _positive_int(config, key, example)
    for key, example in (("total_steps", 1000), ("eval_every_steps", 1000)):
        value = config[key]
        if not isinstance(value, int) or (value <= 0 and value != -1):
            _fail(key, value, "must be a positive number of steps, or -1 for the default", example)
    if config.total_steps == -1:
        _in_range(config, "num_epochs", 0, math.inf, low_open=True, high_open=True, example=10)
    for key, example in (("keep_best_checkpoints", 1), ("heatmap_images", 8), ("seed", 0)):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            _fail(key, value, "must be a non-negative integer", example)
    _in_range(config, "optimizer.learning_rate", 0, math.inf, high_open=True, example=0.1)  # 0: re-evaluate a checkpoint
    _in_range(config, "optimizer.momentum", 0, 1, high_open=True, example=0.9)
    _in_range(config, "optimizer.b1", 0, 1, high_open=True, example=0.9)
    _in_range(config, "optimizer.b2", 0, 1, high_open=True, example=0.999)
    _in_range(config, "optimizer.weight_decay", 0, math.inf, high_open=True, example=1e-4)
    _in_range(config, "optimizer.grad_clip_norm", 0, math.inf, high_open=True, example=1.0)
    _in_range(config, "schedule.warmup_epochs", 0, math.inf, high_open=True, example=0)
    _in_range(config, "schedule.decay_factor", 0, 1, low_open=True, example=0.1)
    _in_range(config, "label_smoothing", 0, 1, high_open=True, example=0.1)
    _in_range(config, "aux_loss_weight", 0, math.inf, high_open=True, example=1.0)
    _in_range(config, "data.crop_min_area", 0, 1, low_open=True, example=0.08)
    _in_range(config, "data.crop_fraction", 0, 1, low_open=True, example=0.875)
    ratio = tuple(config.data.crop_aspect_ratio)
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        _fail("data.crop_aspect_ratio", ratio, "must be (low, high) with 0 < low <= high", "'(0.75,1.333)'")
    workers = config.data.workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < -1:
        _fail("data.workers", workers, "must be -1 (one per core), 0 (in-process) or a number of processes", 2)
    for key, example in (("data.synthetic_train_size", 2000),
                         ("data.synthetic_eval_size", 500), ("data.synthetic_image_size", 64)):
        _positive_int(config, key, example)
    if config.dtype not in DTYPES:
        _fail("dtype", config.dtype, f"is not a supported compute dtype ({', '.join(DTYPES)})", "bfloat16")
    if config.num_classes != -1 and (not isinstance(config.num_classes, int) or config.num_classes < 2):
        _fail("num_classes", config.num_classes, "must be at least 2, or -1 to take it from the dataset", -1)


def check_splits(config: ml_collections.ConfigDict, num_train: int, num_eval: int) -> None:
    """Both splits must hold examples: an empty eval split would only fail after all of training."""
    if num_train <= 0:
        raise UserError(f"the train split {config.data.train_split!r} of {config.dataset} has no readable examples: "
                        "check the dataset path and --config.data.train_split")
    if num_eval <= 0:
        raise UserError(f"the eval split {config.data.eval_split!r} of {config.dataset} has no readable examples: "
                        "check the dataset path and --config.data.eval_split")
