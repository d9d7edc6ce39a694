"""The classifier-head experiment (Qian 2020, Tables 5.1-5.5) end to end on the smoke config."""

import csv
import json
import subprocess
import sys

import figutil
from trainutil import ROOT, train_env

from bagjax.experiments import heads


def _heads_cli(workdir, *args):
    cmd = [sys.executable, "-m", "bagjax.experiments.heads", f"--config={ROOT / 'configs' / 'demo.py'}:smoke",
           f"--workdir={workdir}", "--config.heatmap_images=0", *args]
    return subprocess.run(cmd, cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)


def _final_eval(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "eval_accuracy" in m][-1]


def test_heads_cli_trains_each_head_and_writes_the_thesis_table(tmp_path):
    proc = _heads_cli(tmp_path, "--heads=learned,identity")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "heads.csv").open()))
    assert [r["head"] for r in rows] == ["learned", "identity"]
    for r in rows:  # each row is that run's own final eval
        final = _final_eval(tmp_path / f"{r['head']}_seed0")
        assert abs(float(r["accuracy"]) - final["eval_accuracy"]) < 1e-9
    learned, identity = rows
    # Smoke BagNet: 256 features, 4 classes; the learned head is a 256 x 4 kernel plus a bias, identity has none.
    assert int(learned["head_params"]) == 256 * 4 + 4 and int(identity["head_params"]) == 0
    assert int(learned["params"]) - int(identity["params"]) == 1028
    assert abs(float(identity["savings_percent"]) - 100 * 1028 / int(learned["params"])) < 1e-9
    markdown = (tmp_path / "heads.md").read_text()
    gap = 100 * (float(identity["accuracy"]) - float(learned["accuracy"]))
    assert "| Fixed Identity |" in markdown and f"{gap:+.2f}%" in markdown and "N/A" in markdown
    assert markdown in proc.stdout
    figutil.read_figure(tmp_path / "heads.png", (672, 480))  # figsize (1.8 * 2 heads + 2, 4) at 120 dpi

    # A second call reuses the finished run: it resumes at the last step and only re-evaluates.
    again = _heads_cli(tmp_path, "--heads=learned", f"--out={tmp_path / 'again'}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from step 2" in again.stdout
    assert list(csv.DictReader((tmp_path / "again" / "heads.csv").open()))[0]["accuracy"] == learned["accuracy"]


def test_heads_cli_rejects_an_unknown_head_in_one_line(tmp_path):
    proc = _heads_cli(tmp_path, "--heads=learned,lerned")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown head(s) lerned")


def test_heads_cli_refuses_bad_input_in_one_line_before_training(tmp_path):
    """Extra words, empty or repeated --heads, an --out that is a file, and a head the model does not support:
    one line, exit 1, and nothing trained."""
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    workdir = tmp_path / "runs"
    cases = [(["--heads", "learned", "extra"], "error: unexpected argument(s) 'extra': this command takes none; "
                                                "write every flag as --name=value"),
             (["--heads="], "error: give at least one head"), (["--heads= , "], "error: give at least one head"),
             (["--heads=learned,identity,learned"], "error: --heads lists learned twice: give each head once"),
             ([f"--out={afile}", "--heads=learned"], f"error: --out {afile}: {afile} is a file, not a directory")]
    for args, expected in cases:
        proc = _heads_cli(workdir, *args)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
        assert proc.stderr.startswith(expected), proc.stderr
    # AnchorNet's classifier is its own: the identity head is refused before the learned head trains.
    proc = subprocess.run([sys.executable, "-m", "bagjax.experiments.heads",
                           f"--config={ROOT / 'configs' / 'anchornet_demo.py'}:smoke", f"--workdir={workdir}",
                           "--heads=learned,identity"], cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: AnchorNet only supports head='learned' (its classifier is the per-branch linear 1x1 conv of "
        "Table 2); got head='identity'"], proc.stderr
    assert not workdir.exists() and afile.read_text() == "keep me"


def test_check_heads_drops_blanks():
    assert heads.check_heads(["learned", " identity", ""], 1) == ["learned", "identity"]


def test_run_config_overrides_head_and_seed_on_a_copy():
    from configs import demo

    config = demo.get_config()
    run = heads.run_config(config, "hadamard", 3)
    assert (run.head, run.seed) == ("hadamard", 3)
    assert (config.head, config.seed) == ("learned", 0)
