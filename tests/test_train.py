"""train.py end to end: every config's smoke run, image folders, a bad config key, SIGTERM, 4 devices."""

import importlib
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from trainutil import ROOT, checkpoint_steps, read_metrics, run_train, train_cmd, train_env

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py") if p.name not in ("__init__.py", "default.py"))


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_runs_its_smoke_variant(config, tmp_path):
    proc = run_train(f"{config}:smoke", tmp_path)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("final eval: accuracy="), last
    eval_lines = [m for m in read_metrics(tmp_path) if "eval_accuracy" in m]
    assert eval_lines and {"step", "eval_accuracy", "eval_loss"} <= set(eval_lines[-1])
    assert (tmp_path / "config.json").exists() and (tmp_path / "checkpoints").is_dir()


def test_unknown_config_key_is_a_one_line_error(tmp_path):
    proc = run_train("demo.py:smoke", tmp_path, "--config.batch_sise=8", check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --config.batch_sise=8: "), proc.stderr
    assert "'batch_sise'" in lines[0] and "did you mean 'batch_size'" in lines[0]


def test_a_missing_config_file_and_an_empty_workdir_are_one_line_errors(tmp_path):
    proc = run_train("nope.py", tmp_path, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: cannot load --config {ROOT / 'configs' / 'nope.py'} "), lines
    assert "use one of configs/anchornet_demo.py," in lines[0] and "configs/demo.py" in lines[0]
    proc = run_train("demo.py:smoke", "", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: --workdir is empty: give the directory for checkpoints and metrics, e.g. --workdir runs/demo"]
    assert not (ROOT / "checkpoints").exists() and not (ROOT / "config.json").exists()


def test_broken_config_files_and_stray_words_are_one_line_errors(tmp_path):
    (tmp_path / "syntax.py").write_text("def get_config(arg=None)\n    return None\n")
    (tmp_path / "no_function.py").write_text("BATCH = 8\n")
    (tmp_path / "imports_bad.py").write_text(f"compile('x = (', {str(tmp_path / 'helper.py')!r}, 'exec')\n")
    (tmp_path / "typo.py").write_text("from configs import demo\n\ndef get_config(arg=None):\n"
                                      "    c = demo.get_config(arg)\n    c.optimizer.learning_rat = 1e-3\n"
                                      "    c.model_kwargs.width = 8\n    return c\n")
    cases = {
        ("demo.py:smoke", "--config.data.flip", "False"):  # a space where '=' was meant: flip stayed True
            "error: unexpected argument(s) 'False': this command takes none; write every flag as --name=value",
        ("demo.py:smoke", "--config.init_from=", str(tmp_path)):
            f"error: unexpected argument(s) {str(tmp_path)!r}: this command takes none",
        (str(tmp_path / "syntax.py"),): f"error: cannot load --config {tmp_path / 'syntax.py'} (line 1: expected ':')",
        (str(tmp_path / "imports_bad.py"),):  # the error is in another file: name it
            f"error: cannot load --config {tmp_path / 'imports_bad.py'} ({tmp_path / 'helper.py'} line 1: '(' was",
        (str(tmp_path / "no_function.py"),):
            f"error: cannot load --config {tmp_path / 'no_function.py'}: a config file defines get_config(arg=None)",
        ("demo.py:nonsense",): "error: unknown config argument 'nonsense': use 'smoke' or nothing",
        (str(tmp_path / "typo.py") + ":smoke",):  # a typo inside a config file was silently kept
            "error: the config sets 'optimizer.learning_rat', which is not a bagjax config key; did you mean "
            "'optimizer.learning_rate'? (configs/default.py lists every key)",
    }
    for (config, *overrides), start in cases.items():
        proc = run_train(config, tmp_path / "run", *overrides, check=False)
        assert proc.returncode == 1 and proc.stderr.strip().startswith(start), proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["train.py"], ["-m", "bagjax.experiments.heads"]])
def test_help_lists_the_configs_and_the_common_overrides(command):
    proc = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, env=train_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: ")
    for name in CONFIGS:
        assert f"configs/{name} " in proc.stdout
    assert "--config.total_steps=N" in proc.stdout and "--config.optimizer.learning_rate=X" in proc.stdout


@pytest.mark.parametrize("module", ["predict", "explore", "convert", "launch", "experiments.blackout",
                                    "experiments.lsp"])
def test_every_argparse_command_has_a_working_help(module, capsys):
    main = importlib.import_module(f"bagjax.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


def _write_folder(root: pathlib.Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("validation", 3)):
        for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(colour, 40, (50, 60, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    (root / "train" / "red" / "corrupt.jpg").write_bytes(b"this is not a jpeg")


def test_imagefolder_of_jpegs_trains_and_skips_a_corrupt_file(tmp_path):
    _write_folder(tmp_path / "images")
    proc = run_train("demo.py:smoke", tmp_path / "run", f"--config.dataset=imagefolder:{tmp_path / 'images'}",
                     "--config.total_steps=3")
    out = proc.stdout + proc.stderr
    assert "skipped 1 unreadable image" in out
    eval_line = [m for m in read_metrics(tmp_path / "run") if "eval_accuracy" in m][-1]
    assert eval_line["eval_count"] == 6  # every validation image counted once
    assert proc.stdout.strip().splitlines()[-1].startswith("final eval:")


def _wait_for_checkpoint(workdir: pathlib.Path, proc: subprocess.Popen, timeout: float = 300) -> int:
    start = time.time()
    while time.time() - start < timeout:
        if steps := checkpoint_steps(workdir):
            return steps[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError("no checkpoint appeared")


# A run killed with SIGKILL and restarted ends with the uninterrupted run's parameters: see
# tests/test_fault_tolerance.py, which kills one run five times (the first kill right after its first checkpoint).


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits_0(tmp_path):
    proc = subprocess.Popen(train_cmd("demo.py:smoke", tmp_path, "--config.total_steps=100000",
                                      "--config.checkpoint_every_steps=5", "--config.eval_every_steps=100000",
                                      "--config.log_every_steps=100000"),
                            cwd=ROOT, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = _wait_for_checkpoint(tmp_path, proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    line = [ln for ln in out.splitlines() if ln.startswith("preempted: saved a checkpoint at step")][-1]
    step = int(line.split("at step ")[1].split()[0])
    assert step > first and checkpoint_steps(tmp_path)[-1] == step


def test_sigint_saves_and_exits_130_and_a_signal_during_start_up_says_what_happened(tmp_path):
    cmd = train_cmd("demo.py:smoke", tmp_path, "--config.total_steps=100000", "--config.checkpoint_every_steps=5",
                    "--config.eval_every_steps=100000", "--config.log_every_steps=100000")
    early = subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)  # still importing JAX
    early.send_signal(signal.SIGTERM)
    out, err = early.communicate(timeout=120)
    assert early.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == (
        "error: stopped by SIGTERM outside the training steps (start-up or final evaluation); no checkpoint was "
        "lost: rerun the same command to resume"), err[-3000:]
    assert "Traceback" not in err

    proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = _wait_for_checkpoint(tmp_path, proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    line = [ln for ln in out.splitlines() if ln.startswith("interrupted (SIGINT): saved a checkpoint at step")][-1]
    step = int(line.split("at step ")[1].split()[0])
    assert step > first and checkpoint_steps(tmp_path)[-1] == step


def test_four_devices_match_one_device_loss_curve(tmp_path):
    """The same global batches on a 4-device mesh: losses agree to float32 reduction-order noise (rtol 1e-4).

    SGD, because AdamW's normalisation magnifies rounding noise in parameters with tiny gradients (~4e-4 here), at
    a learning rate where the loss does not jump (at 0.05 the Grain data order makes step 3 overshoot, which
    amplifies the noise to 0.4 % by step 4).
    """
    args = ("--config.total_steps=4", "--config.log_every_steps=1", "--config.eval_every_steps=4",
            "--config.optimizer.name=sgd", "--config.optimizer.learning_rate=0.02", "--config.heatmap_images=0")
    run_train("demo.py:smoke", tmp_path / "one", *args, devices=1)
    run_train("demo.py:smoke", tmp_path / "four", *args, devices=4)
    losses = [[m["train_loss"] for m in read_metrics(tmp_path / d) if "train_loss" in m] for d in ("one", "four")]
    assert len(losses[0]) == 4
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
