"""The LSP experiment (AnchorNet sections 3.3 and 4.3, Tables 3 and 4) end to end on smoke workdirs."""

import concurrent.futures
import csv
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import figutil
from bagjax import downstream
from bagjax.experiments import lsp
from bagjax.localize import LSP_SLACK, LSP_VISUALIZATION
from bagjax.models.anchornet import RECEPTIVE_FIELDS
from trainutil import run_cmd, run_train, train_env

EXAMPLES = 12  # of the 16 tiny eval images; with --batch-size 8 the second batch is partly masked


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """One smoke AnchorNet and one smoke BagNet-17 on synthetic:tiny, trained side by side."""
    anchor, demo = tmp_path_factory.mktemp("anchornet"), tmp_path_factory.mktemp("bagnet")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(run_train, "anchornet_demo.py:smoke", anchor),
                pool.submit(run_train, "demo.py:smoke", demo)]
        for job in jobs:
            job.result()
    return anchor, demo


@pytest.fixture(scope="module")
def lsp_run(workdirs, tmp_path_factory):
    anchor, demo = workdirs
    out = tmp_path_factory.mktemp("lsp")
    proc = run_cmd([sys.executable, "-m", "bagjax.experiments.lsp", f"--workdir={anchor}", f"--downstream={demo}",
                    "--setting=both", "--input-scale=0.5", f"--max-examples={EXAMPLES}", "--batch-size=8",
                    "--patch-batch=16", "--figure-images=2", f"--out={out}"], train_env())
    with open(out / "lsp.csv") as f:
        rows = list(csv.DictReader(f))
    return out, rows, proc.stdout


def _rows(rows, table, method=None):
    return [r for r in rows if r["table"] == table and (method is None or r["method"] == method)]


def test_lsp_command_writes_tables_and_figures(lsp_run):
    out, rows, stdout = lsp_run
    markdown = (out / "lsp.md").read_text()
    assert "Table 3" in markdown and "Table 4" in markdown and "LSP slack" in markdown
    assert markdown in stdout
    # 2 images: 2 settings x 3.2 in and (1 + 3 branches) panels of 3 in, at 100 dpi.
    figutil.read_figure(out / "lsp_patches.png", (640, 640))
    figutil.read_figure(out / "lsp_attention.png", (1200, 600))
    assert {r["method"] for r in _rows(rows, "3")} == {"full image", "AnchorNet (Eq. 7)", "LSP visualization",
                                                       "LSP slack"}
    assert [r["method"] for r in _rows(rows, "4")] == [f"{rf}^2-{k}" for rf in RECEPTIVE_FIELDS for k in "RL"]


def test_lsp_numbers_are_sane(lsp_run):
    _, rows, _ = lsp_run
    for r in rows:
        if int(r["images"]):
            assert 0.0 <= float(r["top1"]) <= float(r["top5"]) <= 1.0, r
        assert float(r["total_gflops"]) > 0 or not int(r["images"]), r
    for name, settings in (("visualization", LSP_VISUALIZATION), ("slack", LSP_SLACK)):
        branches = _rows(rows, "3", f"LSP {name}")
        assert [r["branch"] for r in branches] == [f"B{rf}" for rf in RECEPTIVE_FIELDS] + ["all"]
        assert sum(int(r["images"]) for r in branches[:-1]) == int(branches[-1]["images"]) == EXAMPLES
        for r, rf in zip(branches, RECEPTIVE_FIELDS):
            if int(r["images"]):
                assert 1.0 <= float(r["patches_per_image"]) <= settings[rf].max_patches, r
                assert float(r["total_gflops"]) > float(r["classifier_gflops"]) > 0, r
        assert 1.0 <= float(branches[-1]["patches_per_image"]) <= max(s.max_patches for s in settings.values())
    # Table 4 splits the same images over the branches as Table 3.
    t3 = {r["branch"]: int(r["images"]) for r in _rows(rows, "3", "LSP slack")}
    for r in _rows(rows, "4"):
        assert int(r["images"]) == t3[r["branch"]] and float(r["patches_per_image"]) == 1.0
    full, = _rows(rows, "3", "full image")
    assert int(full["images"]) == EXAMPLES and float(full["classifier_gflops"]) > 0
    # --input-scale=0.5: the 112 px image and the 63/95/111 px patches reach the classifier at half size.
    assert int(full["classifier_input"]) == 56
    assert [int(r["classifier_input"]) for r in _rows(rows, "3", "LSP slack")[:3]] == [32, 48, 56]


def test_lsp_rejects_swapped_workdirs(workdirs):
    anchor, demo = workdirs
    with pytest.raises(ValueError, match="AnchorNet workdir"):
        lsp.main([f"--workdir={demo}", f"--downstream={anchor}"])


def test_lsp_rejects_inputs_below_the_classifiers_receptive_field(workdirs):
    anchor, demo = workdirs
    # 0.2 x 63 = 13 px patches for a BagNet-17: one line naming the scale that works, before any compilation.
    with pytest.raises(ValueError, match=r"13 px .* 17 px.*--input-scale 0\.27"):
        lsp.main([f"--workdir={anchor}", f"--downstream={demo}", "--input-scale=0.2"])


def test_lsp_refuses_an_out_that_is_a_file_in_one_line_before_localizing(workdirs, tmp_path):
    anchor, demo = workdirs
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    proc = run_cmd([sys.executable, "-m", "bagjax.experiments.lsp", f"--workdir={anchor}", f"--downstream={demo}",
                    f"--out={afile}"], train_env(), check=False)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        f"error: --out {afile}: {afile} is a file, not a directory: give a directory to write the results to (it "
        "is created if missing)"], proc.stderr
    assert afile.read_text() == "keep me"


def test_lsp_checks_figure_images_before_loading(tmp_path):
    with pytest.raises(ValueError, match="--figure-images must be 0"):
        lsp.main([f"--workdir={tmp_path / 'missing'}", f"--downstream={tmp_path / 'missing'}", "--figure-images=-1"])


def test_gather_patches_cuts_each_box_from_its_image():
    images = jnp.asarray(np.random.default_rng(0).standard_normal((3, 70, 80, 3)), jnp.float32)
    index = np.array([2, 0, 2], np.int32)
    boxes = np.array([[0, 8, 63, 71], [7, 16, 70, 79], [0, 0, 63, 63]], np.int32)
    got = np.asarray(downstream.gather_patches(images, index, boxes, patch_size=63, out_size=63))
    for n, (i, (y0, x0, y1, x1)) in enumerate(zip(index, boxes)):
        np.testing.assert_array_equal(got[n], np.asarray(images)[i, y0:y1, x0:x1])
    assert downstream.gather_patches(images, index, boxes, patch_size=63, out_size=40).shape == (3, 40, 40, 3)


def test_inputs_per_patch_input_mode():
    assert downstream.Inputs.make("resize", 224, 96).patch == {63: 96, 95: 96, 111: 96}
    native = downstream.Inputs.make("native", 224, 96)
    assert native.full == 224 and native.patch == {63: 63, 95: 95, 111: 111}
    with pytest.raises(ValueError, match="--patch-input"):
        downstream.Inputs.make("crop", 224, 96)


def test_input_scale_resizes_every_native_input():
    half = downstream.Inputs.make("native", 112, 48, 0.5)
    assert half.full == 56 and half.patch == {63: 32, 95: 48, 111: 56}
    with pytest.raises(ValueError, match="--input-scale"):
        downstream.Inputs.make("resize", 112, 48, 0.5)
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive"):
            downstream.Inputs.make("native", 112, 48, bad)
