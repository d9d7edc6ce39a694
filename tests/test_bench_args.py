"""The bench/ scripts refuse bad arguments with one ``error: ...`` line and exit status 1, before any work."""

import subprocess
import sys

import pytest

from trainutil import ROOT, train_env

CASES = [  # (script, arguments, what the line must say); {file} and {workdir} are filled in by the test
    ("bn_statistics.py", ["--workdir", "nonexist"], "nonexist is not a bagjax training workdir"),
    ("bn_statistics.py", ["--workdir", "{workdir}", "--step", "99"], "--step 99: "),
    ("bn_statistics.py", [], "the following arguments are required: --workdir"),
    ("models.py", ["--batch", "0"], "--batch must be at least 1, got 0"),
    ("models.py", ["--size", "20"], "--size must be at least 33, got 20"),
    ("robust.py", ["--images", "0"], "--images must be at least 1, got 0"),
    ("robust.py", ["--patch", "500"], "--patch must be at most the 224 px image, got 500"),
    ("fsdp.py", ["--devices", "0"], "--devices must be at least 1, got 0"),
    ("fsdp.py", ["--devices", "2", "--batch", "3"], "--batch 3 is not divisible by the 2 devices"),
    ("train_step.py", ["--batch", "0", "--no-torch"], "--batch must be at least 1, got 0"),
    ("train_step.py", ["--no-torch", "--profile", "{file}"], "is a file, not a directory"),
    ("depthwise.py", ["--batch", "0"], "--batch must be at least 1, got 0"),
    ("depthwise.py", ["--image-size", "64"], "--image-size must be at least 111, got 64"),
    ("heatmap.py", ["--patches", "0"], "--patches must be at least 1, got 0"),
    ("explore_size.py", ["--max-classes", "2"], "--max-classes must be at least 5, got 2"),
    ("input_pipeline.py", ["--workers", "0"], "--workers must be at least 1, got 0"),
    ("input_pipeline.py", ["--dtype", "f16"], "invalid choice: 'f16'"),
    ("export.py", ["--size", "20"], "--size must be at least 33, got 20"),
    ("folder_index.py", ["--workers", "0"], "--workers must be at least 1, got 0"),
    ("lsp.py", ["--images", "3"], "unrecognized arguments: --images 3"),
    ("folder_recipe.py", ["--num-train", "5"], "--num-train must be at least 10, got 5"),
    ("transfer.py", ["--per-class", "0"], "--per-class must be at least 1, got 0"),
    ("transfer.py", ["--budget", "0"], "--budget must be positive, got 0"),
    ("linear_probe.py", ["--epochs", "0"], "--epochs must be at least 1, got 0"),
]


@pytest.mark.parametrize("script,args,expected", CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_argument_is_one_error_line_before_any_work(script, args, expected, tmp_path):
    workdir = tmp_path / "run"  # a workdir (config.json, checkpoints/) without the step asked for
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    (tmp_path / "file").write_text("")
    args = [a.format(workdir=workdir, file=tmp_path / "file") for a in args]
    proc = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, env=train_env(),
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr[-3000:]
    assert proc.stdout == ""  # nothing measured, nothing printed
