"""Shared output helpers for the experiments: mean ± std over seeds, Markdown tables, CSV files, figures.

The experiments report the way their papers do (blackout paper Table 1, thesis Tables 5.1-5.5): one cell per
setting, the mean over seeds with its sample standard deviation when there is more than one seed.
"""

from __future__ import annotations

import csv
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np

from bagjax import atomic
from bagjax.errors import UserError


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def format_mean_std(values: Sequence[float], digits: int = 4, scale: float = 1.0, suffix: str = "") -> str:
    """``m`` for one value, ``m ± s`` for several, each multiplied by ``scale`` and followed by ``suffix``."""
    m, s = mean_std(values)
    if len(values) == 1:
        return f"{m * scale:.{digits}f}{suffix}"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}{suffix}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; cells are converted with ``str``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(path: str | pathlib.Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows of dicts with the same keys as one CSV file with a header line."""
    if not rows:
        raise UserError(f"nothing to write to {path}: the experiment produced no rows")
    with atomic.replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_figure(fig, path: str | pathlib.Path, dpi: int) -> None:
    """Save a matplotlib figure as a whole file or none (bagjax.atomic), and close it."""
    with atomic.replacing(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    pyplot().close(fig)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (experiments run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
