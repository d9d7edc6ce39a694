"""Metric logging: one JSON object per line in ``metrics.jsonl`` and TensorBoard event files."""

from __future__ import annotations

import json
import pathlib


class MetricWriter:
    """Appends ``{"step": s, **metrics}`` to ``workdir/metrics.jsonl`` and writes TensorBoard scalars.

    ``resume_step``: the step a run resumed from. Records past it (logged by a killed run after its last
    checkpoint) are dropped from metrics.jsonl, and TensorBoard is told to purge them (a ``SessionLog.START``
    at ``resume_step + 1``), so no step appears twice.
    """

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        if not enabled:
            return
        from tensorboardX import SummaryWriter

        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        if resume_step > 0 and self.path.exists():
            lines = self.path.read_text().splitlines(keepends=True)
            kept = [ln for ln in lines if _step_of(ln) is not None and _step_of(ln) <= resume_step]
            if len(kept) != len(lines):
                tmp = self.path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(kept))
                tmp.replace(self.path)
        self.tensorboard = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"),
                                         purge_step=resume_step + 1 if resume_step > 0 else None)

    def note(self, step: int, record: dict) -> None:
        """A record that is not a scalar (e.g. ``data_changed``: what changed in the data at a resume), in
        metrics.jsonl only."""
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": int(step), **record}) + "\n")

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


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl line, or None for a line a kill left half written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
