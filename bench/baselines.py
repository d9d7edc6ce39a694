"""What the own-images benchmarks share (not a benchmark itself): scikit-learn's classical classifiers on the
raw pixels of an image folder, and a ``train.py`` run timed as a user starts it."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import numpy as np
from PIL import Image

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pixels(folder: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    files = sorted((folder / split).glob("*/*.png"))
    x = np.stack([np.asarray(Image.open(f).convert("L"), np.float32).ravel() / 255 for f in files])
    return x, np.array([f.parent.name for f in files])


def classical(folder: pathlib.Path) -> dict[str, float]:
    """Eval accuracy of ``LogisticRegression`` and an RBF ``SVC`` (scikit-learn defaults) on the gray pixels of
    ``folder/{train,validation}``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC

    (x, y), (xe, ye) = _pixels(folder, "train"), _pixels(folder, "validation")
    return {name: float((model.fit(x, y).predict(xe) == ye).mean())
            for name, model in (("logistic regression", LogisticRegression(max_iter=5000)), ("SVC (RBF)", SVC()))}


def train(config_arg: str, workdir: pathlib.Path, *overrides: str) -> dict[str, float]:
    """``python train.py --config configs/CONFIG_ARG --workdir WORKDIR ...``: its final eval line from
    metrics.jsonl plus ``seconds`` (wall time, start-up and compilation included)."""
    start = time.perf_counter()
    config = REPO_ROOT / "configs" / config_arg
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), f"--config={config}",
                           f"--workdir={workdir}", "--config.heatmap_images=0", *overrides],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"train.py {config_arg} failed:\n{proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = [m for m in lines if "guard_eval_accuracy" in m][-1]
    recipe = next(line for line in proc.stdout.splitlines() if line.startswith("folder recipe"))
    return {**final, "seconds": time.perf_counter() - start, "recipe": recipe}
