"""Metric logging: one JSON object per line in ``metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import pathlib


class MetricWriter:
    """Appends ``{"step": s, **metrics}`` to ``workdir/metrics.jsonl`` and writes TensorBoard scalars."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}}) + "\n")
        for k, v in metrics.items():
            self.tensorboard.add_scalar(k, float(v), int(step))
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()
