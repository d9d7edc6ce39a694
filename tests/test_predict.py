"""python -m bagjax.predict on image files, with a workdir trained by train.py (smoke config)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import figutil
from trainutil import ROOT, train_env


def test_predict_prints_top_classes_and_writes_a_heatmap_per_image(smoke_workdir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(smoke_workdir, workdir)
    rng = np.random.default_rng(0)
    image = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 255, (60, 50, 3), dtype=np.uint8)).save(image)
    gray = tmp_path / "gray.jpg"
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8), mode="L").save(gray)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    (tmp_path / "other").mkdir()
    same_stem = tmp_path / "other" / "photo.png"
    Image.fromarray(rng.integers(0, 255, (60, 50, 3), dtype=np.uint8)).save(same_stem)

    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "bagjax.predict", "--workdir", str(workdir), "--stride1",
                           str(image), str(gray), str(broken), str(tmp_path / "other"), str(tmp_path / "empty")],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "read only" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr  # orbax's read-only notes
    assert (workdir / "predictions" / "photo-2_heatmap.png").is_file()  # the same stem does not overwrite
    assert f"heatmap: {workdir / 'predictions' / 'photo-2_heatmap.png'}" in proc.stdout
    lines = proc.stdout.splitlines()
    for name in ("photo", "gray"):
        start = lines.index(f"{tmp_path / name}.{'png' if name == 'photo' else 'jpg'}:")
        probabilities = [float(line.split("%")[0]) for line in lines[start + 1:start + 5]]
        assert len(probabilities) == 4  # synthetic:tiny has 4 classes; top-5 shows them all
        assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 100) < 0.1
        pixels = figutil.read_figure(workdir / "predictions" / f"{name}_heatmap.png", (600, 300))  # image + map
        assert (figutil.red(pixels[:, 300:]) | figutil.blue(pixels[:, 300:])).mean() > 0.1
    assert "broken.jpg: skipped" in proc.stderr  # a folder stands for its images; an empty one is skipped too
    assert f"{same_stem}:" in lines and f"{tmp_path / 'empty'}: skipped (a directory without" in proc.stderr


def test_predict_on_a_directory_that_is_not_a_workdir_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bagjax.predict", "--workdir", str(tmp_path), "x.png"],
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "not a bagjax training workdir" in proc.stderr


def _predict_error(capsys, *argv: str) -> str:
    from bagjax import predict

    with pytest.raises(SystemExit) as exit_info:
        predict.main(list(argv))
    assert exit_info.value.code not in (0, None)
    err = capsys.readouterr().err.strip()
    assert str(exit_info.value.code).startswith("error: "), exit_info.value.code
    assert "Traceback" not in err
    return str(exit_info.value.code)


def test_predict_on_damaged_workdirs_and_bad_outputs_is_one_line(smoke_workdir, tmp_path, capsys):
    workdir = smoke_workdir
    image = tmp_path / "photo.png"
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")

    assert _predict_error(capsys, "--workdir", str(workdir), str(broken)) == \
        "error: none of the images could be read (see above)"
    assert _predict_error(capsys, "--workdir", str(workdir), "--out", str(image), str(image)) == \
        f"error: --out {image} is a file: give a directory for the heatmaps"
    if os.geteuid() != 0:  # root writes into read-only directories
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o555)
        assert "cannot write heatmaps to" in _predict_error(capsys, "--workdir", str(workdir), "--out",
                                                             str(readonly / "x"), str(image))

    damaged = {"broken_config": lambda w: (w / "config.json").write_text("{broken"),
               "no_dataset_json": lambda w: (w / "dataset.json").unlink(),
               "corrupt_checkpoint": lambda w: [os.truncate(p, 10) for p in (w / "checkpoints").rglob("*")
                                                if p.is_file()]}
    expected = {"broken_config": "config.json is not valid JSON", "no_dataset_json": "dataset.json is missing",
                "corrupt_checkpoint": "is unreadable"}
    for name, damage in damaged.items():
        copy = tmp_path / name
        shutil.copytree(workdir, copy)
        damage(copy)
        assert expected[name] in _predict_error(capsys, "--workdir", str(copy), str(image)), name


def test_running_the_interpret_library_points_to_predict():
    proc = subprocess.run([sys.executable, "-m", "bagjax.interpret", "--workdir", "run", "photo.jpg"], cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "python -m bagjax.predict --workdir WORKDIR IMAGE|FOLDER" in lines[0]
