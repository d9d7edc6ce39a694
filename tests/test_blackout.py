"""Patch/channel blackout (Zou, Yan & Liu, sections 5-6, Table 1) and sparse kept-patch evaluation."""

import errno
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import figutil
from bagjax import blackout, cli, data, patches
from bagjax.experiments import blackout as experiment
from bagjax.models import create_model
from bagjax.workdir import load_trained
from trainutil import ROOT, file_and_moved_workdir, train_env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A two-step BagNet-17 smoke run: its workdir, final eval metrics and the loaded model."""
    from configs import demo
    from bagjax.training.loop import train_and_evaluate

    config = demo.get_config("smoke")
    config.heatmap_images = 0
    workdir = tmp_path_factory.mktemp("blackout_smoke")
    metrics = train_and_evaluate(config, str(workdir))
    return workdir, metrics, load_trained(workdir)


def _eval_batch(trained):
    return next(iter(data.eval_batches(trained.config, process_index=0, process_count=1)))


def test_keep_all_equals_plain_eval(smoke):
    _, metrics, trained = smoke
    rows = blackout.run_blackout(trained.model, trained.variables, trained.config,
                                 [blackout.Scheme("none", 1.0), blackout.Scheme("random", 1.0)])
    for row in rows:
        assert row["examples"] == metrics["eval_count"]
        np.testing.assert_allclose(row["accuracy"], metrics["eval_accuracy"], atol=1e-6)
        np.testing.assert_allclose(row["loss"], metrics["eval_loss"], rtol=1e-5)


def test_alternating_keeps_half_of_an_even_grid_as_a_checkerboard():
    mask = blackout.alternating_mask((24, 24))
    assert mask.sum() == 288
    assert mask[0, 0] and not mask[0, 1] and not mask[1, 0] and mask[1, 1]
    np.testing.assert_array_equal(mask[:, :-1] ^ mask[:, 1:], True)  # neighbours always differ
    np.testing.assert_array_equal(mask[:-1] ^ mask[1:], True)
    logits = jnp.zeros((3, 24, 24, 5))
    m = blackout.patch_mask(blackout.Scheme("alternating", 0.5), logits, jnp.arange(3))
    assert m.shape == (3, 24, 24) and int(m.sum()) == 3 * 288
    np.testing.assert_array_equal(blackout.alternating_mask((6,)), [1, 0, 1, 0, 1, 0])


def test_random_and_top_masks_keep_the_requested_count():
    logits = jax.random.normal(jax.random.key(0), (4, 24, 24, 3))
    for keep, kept in ((0.25, 144), (0.5, 288), (0.75, 432), (0.0, 1)):
        for policy in ("random", "top"):
            m = blackout.patch_mask(blackout.Scheme(policy, keep, seed=1), logits, jnp.arange(4))
            np.testing.assert_array_equal(m.sum(axis=(1, 2)), kept)
    a = blackout.patch_mask(blackout.Scheme("random", 0.5, 1), logits, jnp.arange(4))
    b = blackout.patch_mask(blackout.Scheme("random", 0.5, 2), logits, jnp.arange(4))
    assert not np.array_equal(a, b)
    # A mask depends on the example's index, not on which batch it came in.
    np.testing.assert_array_equal(blackout.patch_mask(blackout.Scheme("random", 0.5, 1), logits[2:], jnp.arange(2, 4)),
                                  a[2:])
    # Top-evidence keeps exactly the patches with the largest logit of the predicted class.
    top = blackout.patch_mask(blackout.Scheme("top", 0.1), logits, jnp.arange(4))
    predicted = np.argmax(np.asarray(logits).mean(axis=(1, 2)), -1)
    for i in range(4):
        evidence = np.asarray(logits[i, ..., predicted[i]])
        assert evidence[np.asarray(top[i])].min() >= evidence[~np.asarray(top[i])].max()


def test_channel_mode_equals_hand_masked_fc(smoke):
    _, _, trained = smoke
    model, variables = trained.model, trained.variables
    batch = _eval_batch(trained)
    features = jax.jit(lambda v, x: model.apply(v, data.normalize(x), method="features"))(variables, batch["image"])
    h = np.asarray(features).mean(axis=(1, 2))
    w = np.asarray(variables["params"]["head"]["kernel"])
    b = np.asarray(variables["params"]["head"]["bias"])
    labels, valid = batch["label"], np.asarray(batch["mask"], bool)
    alternating = (np.arange(w.shape[0]) % 2 == 0).astype(np.float32)
    schemes = [blackout.Scheme("alternating", 0.5), blackout.Scheme("random", 0.25, seed=3)]
    correct, loss = blackout.channel_scheme_sums(jnp.asarray(h), labels, valid,
                                                 blackout.head_function(model, variables), schemes)
    random_mask = np.asarray(blackout.channel_mask(schemes[1], jnp.zeros((1, w.shape[0]))))[0]
    assert random_mask.sum() == round(0.25 * w.shape[0])
    for i, mask in enumerate((alternating, random_mask.astype(np.float32))):
        logits = h @ (w * mask[:, None]) + b  # the paper code: zeroed fc columns, bias kept, no renormalisation
        shifted = logits - logits.max(-1, keepdims=True)
        ce = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(labels)), labels]
        np.testing.assert_allclose(correct[i], np.sum((logits.argmax(-1) == labels) * valid), atol=1e-6)
        np.testing.assert_allclose(loss[i], np.sum(ce * valid), rtol=1e-4)


def test_channel_mode_refuses_a_nonlinear_head():
    with pytest.raises(ValueError, match="linear head"):
        blackout.check_channel_mode(create_model("bagnet9", num_classes=3, head="orthogonal", width=4))


def test_sparse_kept_patches_equal_masked_dense_mean():
    model = create_model("bagnet9", num_classes=4, width=4, stage_sizes=(1, 1, 1, 1))
    x = jax.random.normal(jax.random.key(1), (1, 48, 48, 3))
    variables = blackout.random_variables(model)
    dense = jax.jit(lambda v, x: model.apply(v, x, method="patch_logits"))(variables, x)
    mask = blackout.patch_mask(blackout.Scheme("random", 0.3, seed=7), dense, jnp.arange(1))
    locations = np.argwhere(np.asarray(mask[0]))
    assert len(locations) == 8  # 30% of the 5 x 5 grid
    sparse = jax.jit(lambda v, x: patches.per_patch_logits(model, v, x, locations))(variables, x).mean(axis=1)
    np.testing.assert_allclose(sparse, blackout.kept_patch_logits(dense, mask), atol=1e-4)


def test_compute_table_counts_kept_patches():
    rows = blackout.compute_table(("bagnet9",), (0.0, 0.5, 1.0), image_size=48, num_classes=3, repeats=1,
                                  width=4, stage_sizes=(1, 1, 1, 1))
    n = rows[0]["patches"]
    assert n == 25 and [r["kept"] for r in rows] == [1, 13, 25]
    flops = [r["sparse_gflops"] for r in rows]
    assert flops[0] < rows[0]["dense_gflops"] and flops[0] < flops[1] < flops[2]
    # Sparse cost is linear in the kept patches: every patch costs the same.
    np.testing.assert_allclose((flops[2] - flops[1]) / 12, (flops[1] - flops[0]) / 12, rtol=0.02)
    assert "break-even" in experiment.compute_markdown(rows)


def test_cli_writes_table_csv_and_plot(smoke, tmp_path, capsys):
    workdir, _, _ = smoke
    experiment.main(["--workdir", str(workdir), "--out", str(tmp_path), "--seeds", "2", "--keeps", "0,0.5",
                   "--max-examples", "10"])
    markdown = (tmp_path / "blackout.md").read_text()
    assert 'Random 75% "blackout"' in markdown and "Alternating" in markdown and "10 examples of split `validation`" in markdown
    assert markdown in capsys.readouterr().out
    lines = (tmp_path / "blackout.csv").read_text().splitlines()
    # none + alternating + random (2 seeds) and top at keeps {0, 0.25, 0.5, 0.75}
    assert len(lines) == 1 + 2 + 4 * 2 + 4
    pixels = figutil.read_figure(tmp_path / "blackout.png", (1320, 504))  # figsize (11, 4.2) at 120 dpi
    for colour in (figutil.TAB_BLUE, figutil.TAB_ORANGE, figutil.TAB_GREEN):  # random, top-evidence, alternating
        for half in (pixels[:, :660], pixels[:, 660:]):  # accuracy and cross-entropy panels
            assert figutil.share_of_colour(half, colour) > 1e-4, colour


def test_cli_rejects_bad_arguments(smoke, tmp_path):
    workdir, _, _ = smoke
    with pytest.raises(ValueError, match="--seeds"):
        experiment.main(["--workdir", str(workdir), "--out", str(tmp_path), "--seeds", "0"])
    with pytest.raises(SystemExit):
        experiment.main(["--out", str(tmp_path)])


@pytest.mark.parametrize("args,match", [
    (["--compute-batch", "0"], "--compute-batch must be at least 1"),
    (["--compute-image-size", "20"], "--compute-image-size must be at least 33 px"),
    (["--compute-keeps", ""], "give at least one --compute-keeps"),
    (["--compute-keeps", "0.5,2"], r"--compute-keeps must lie in \[0, 1\], got \[2.0\]")])
def test_compute_table_checks_its_numbers_before_computing(tmp_path, args, match):
    with pytest.raises(ValueError, match=match):
        experiment.main(["--compute-table", "--out", str(tmp_path / "out"), *args])
    assert not (tmp_path / "out").exists()


def test_bad_out_and_missing_dataset_are_one_line_before_any_work(smoke, tmp_path):
    """--out naming a file, and a workdir whose dataset is gone: one line, exit 1, nothing evaluated or touched."""
    workdir, _, _ = smoke
    afile, moved = file_and_moved_workdir(workdir, tmp_path, f"imagefolder:{tmp_path / 'gone'}")
    for run, expected in ((["--workdir", str(workdir), "--out", str(afile)], f"{afile} is a file, not a directory"),
                          (["--compute-table", "--compute-batch", "0", "--out", str(tmp_path)],
                           "--compute-batch must be at least 1"),
                          (["--workdir", str(moved)], f"takes the dataset from {moved / 'config.json'}: edit")):
        proc = subprocess.run([sys.executable, "-m", "bagjax.experiments.blackout", *run], cwd=ROOT, env=train_env(),
                              capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert expected in lines[0], lines
    assert afile.read_text() == "keep me" and not (moved / "blackout").exists()


def test_run_main_turns_system_and_data_errors_into_one_line(monkeypatch):
    """What the experiment commands print for an OSError from the system and an unavailable dataset."""
    def fails(error):
        def main():
            raise error
        return main

    for error, line in ((FileExistsError(errno.EEXIST, "File exists", "/r/afile"),
                         "error: File exists: /r/afile: a file is in the way: give a directory path"),
                        (OSError(errno.ENOSPC, "No space left on device", "/r/x.png"),
                         "error: No space left on device: /r/x.png: free disk space and rerun the same command"),
                        (data.DatasetUnavailableError("tfds dataset 'x' is not\nprepared"),
                         "error: tfds dataset 'x' is not prepared")):
        with pytest.raises(SystemExit) as exit_:
            cli.run_main(fails(error))
        assert exit_.value.code == line
    monkeypatch.setenv("BAGJAX_TRACEBACK", "1")
    with pytest.raises(FileExistsError):
        cli.run_main(fails(FileExistsError(errno.EEXIST, "File exists", "/r/afile")))


def test_split_option_evaluates_another_split(smoke, tmp_path):
    """The paper's Table 1 is on the test split: --split picks any split of the workdir's dataset."""
    workdir, metrics, _ = smoke
    experiment.main(["--workdir", str(workdir), "--out", str(tmp_path), "--seeds", "1", "--keeps", "0.5",
                   "--split", "train[:7]"])
    markdown = (tmp_path / "blackout.md").read_text()
    assert "7 examples of split `train[:7]`" in markdown and metrics["eval_count"] != 7
    rows = (tmp_path / "blackout.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["mode", "split"] and all(",train[:7]," in r for r in rows[1:])
    with pytest.raises(ValueError, match="no split 'tset'"):
        experiment.main(["--workdir", str(workdir), "--out", str(tmp_path), "--split", "tset"])


def test_missing_workdir_is_one_line_and_creates_nothing(tmp_path):
    missing = tmp_path / "no_such_run"
    for module, extra in (("blackout", []), ("lsp", ["--downstream", str(missing)])):
        proc = subprocess.run([sys.executable, "-m", f"bagjax.experiments.{module}", "--workdir", str(missing),
                               *extra], cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "is not a bagjax training workdir" in proc.stderr
        assert not missing.exists()


@pytest.mark.parametrize("moment", ["1.5 s", "5 s", "as it writes"])
def test_sigint_at_any_moment_is_one_line_exit_130_and_leaves_no_partial_file(smoke, tmp_path, moment):
    """Ctrl-C while jax loads, while it compiles or evaluates, and as the outputs are written: one line, no
    traceback, exit 130 (not a segfault), and every output file whole or absent (written, then renamed)."""
    import csv
    import signal
    import time

    from PIL import Image

    workdir, _, _ = smoke
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "bagjax.experiments.blackout", "--workdir", str(workdir), "--seeds",
                             "1", "--keeps", "0.5", "--max-examples", "8", "--out", str(out)], cwd=ROOT,
                            env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if moment == "as it writes":
        while proc.poll() is None and not out.exists():
            time.sleep(0.002)
    else:
        time.sleep(float(moment.split()[0]))
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if proc.returncode in (0, -signal.SIGINT):  # it finished before the signal (a SIGINT during the interpreter's
        # teardown, after main returned, meets Python's restored default handler): everything must be there
        assert written == ["blackout.csv", "blackout.md", "blackout.png"], stderr
        assert "Traceback" not in stderr, stderr
    else:
        assert proc.returncode == 130 and "Traceback" not in stderr, stderr
        assert stderr.strip().splitlines()[-1].startswith("error: stopped by SIGINT: "), stderr
    assert set(written) <= {"blackout.csv", "blackout.md", "blackout.png"}, written  # no temporary file left
    if "blackout.csv" in written:
        assert len(list(csv.DictReader((out / "blackout.csv").open()))) == 8  # one row per scheme
    if "blackout.md" in written:
        assert (out / "blackout.md").read_text().endswith("\n")
    if "blackout.png" in written:
        Image.open(out / "blackout.png").load()
