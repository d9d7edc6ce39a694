"""python -m bagjax.predict on image files, with a workdir trained by train.py (smoke config)."""

import subprocess
import sys

import numpy as np
from PIL import Image

import figutil
from trainutil import ROOT, run_train, train_env


def test_predict_prints_top_classes_and_writes_a_heatmap_per_image(tmp_path):
    workdir = tmp_path / "run"
    run_train("demo.py:smoke", workdir, "--config.heatmap_images=0")
    rng = np.random.default_rng(0)
    image = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (60, 50, 3), dtype=np.uint8)).save(image)
    gray = tmp_path / "gray.jpg"
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), mode="L").save(gray)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")

    proc = subprocess.run([sys.executable, "-m", "bagjax.predict", "--workdir", str(workdir), "--stride1",
                           str(image), str(gray), str(broken)],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for name in ("photo", "gray"):
        start = lines.index(f"{tmp_path / name}.{'png' if name == 'photo' else 'jpg'}:")
        probabilities = [float(line.split("%")[0]) for line in lines[start + 1:start + 5]]
        assert len(probabilities) == 4  # synthetic:tiny has 4 classes; top-5 shows them all
        assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 100) < 0.1
        pixels = figutil.read_figure(workdir / "predictions" / f"{name}_heatmap.png", (600, 300))  # image + map
        assert (figutil.red(pixels[:, 300:]) | figutil.blue(pixels[:, 300:])).mean() > 0.1
    assert "broken.jpg: skipped" in proc.stderr


def test_predict_on_a_directory_that_is_not_a_workdir_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bagjax.predict", "--workdir", str(tmp_path), "x.png"],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "not a bagjax training workdir" in proc.stderr
