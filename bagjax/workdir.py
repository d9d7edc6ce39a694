"""What a training workdir holds, and loading a trained model from it for evaluation and interpretation.

A workdir has ``config.json`` (the full config), ``dataset.json`` (class names and split sizes),
``checkpoints/`` (orbax), ``metrics.jsonl`` and TensorBoard events. Experiments, heatmaps and
``bagjax.predict`` all start from ``load_trained(workdir)``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import flax.linen as nn
import ml_collections

from bagjax.models import create_model
from bagjax.training import checkpoints

DATASET_FILE = "dataset.json"


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The model a config describes, with ``num_classes`` outputs."""
    return create_model(config.model, num_classes=num_classes, head=config.head, dtype=config.dtype,
                        **dict(config.get("model_kwargs", {})))


def write_dataset_info(workdir: str | pathlib.Path, class_names: tuple[str, ...], num_train: int,
                       num_eval: int) -> None:
    info = {"class_names": list(class_names), "num_classes": len(class_names), "num_train": num_train,
            "num_eval": num_eval}
    (pathlib.Path(workdir) / DATASET_FILE).write_text(json.dumps(info, indent=2) + "\n")


def read_dataset_info(workdir: str | pathlib.Path) -> dict[str, Any]:
    """A workdir's ``dataset.json`` (class names and split sizes)."""
    path = pathlib.Path(workdir) / DATASET_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing: rerun train.py with the same config on {workdir}, "
                                "which writes it again") from None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): rerun train.py with the same config on {workdir}, "
                         "which writes it again") from None


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
        raise FileNotFoundError(f"{workdir} is not a bagjax training workdir (no config.json and checkpoints/): "
                                "train one with python train.py --config configs/demo.py --workdir DIR")
    config = checkpoints.read_config(workdir)
    info = read_dataset_info(workdir)
    variables = checkpoints.read_variables(workdir, step)
    model = build_model(config, info["num_classes"])
    return Trained(config, model, variables, tuple(info["class_names"]))
