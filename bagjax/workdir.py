"""Loading a trained model from a training workdir for evaluation and interpretation.

A workdir has ``config.json`` (the full config), ``dataset.json`` (class names and split sizes),
``checkpoints/`` (orbax), ``metrics.jsonl`` and TensorBoard events; ``bagjax.training.checkpoints`` reads and
writes that format. Experiments, heatmaps and ``bagjax.predict`` all start from ``load_trained(workdir)``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import flax.linen as nn
import ml_collections

from bagjax.models import build_model
from bagjax.training import checkpoints
from bagjax.errors import PathNotFoundError


@dataclasses.dataclass(frozen=True)
class Trained:
    """A trained model ready for ``model.apply(variables, images, train=False)``."""

    config: ml_collections.ConfigDict
    model: nn.Module
    variables: dict[str, Any]
    class_names: tuple[str, ...]


def load_trained(workdir: str | pathlib.Path, step: int | None = None) -> Trained:
    """Config, model and variables of a workdir (its best checkpoint by eval accuracy, else the latest)."""
    workdir = pathlib.Path(workdir)
    if not checkpoints.is_workdir(workdir):
        raise PathNotFoundError(f"{workdir} is not a bagjax training workdir (no config.json and checkpoints/): "
                                "train one with python train.py --config configs/demo.py --workdir DIR")
    config = checkpoints.read_config(workdir)
    info = checkpoints.read_dataset_info(workdir)
    variables = checkpoints.read_variables(workdir, step)
    model = build_model(config, info["num_classes"])
    return Trained(config, model, variables, tuple(info["class_names"]))
