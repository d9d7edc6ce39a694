"""Scale-out: the local launcher, 2 processes x 2 CPU devices against 1 process x 4, restores across topologies.

The global batch of step s depends only on (seed, s) and each process feeds its contiguous slice
(bagjax/data/pipeline.py), so any split of the same 4 devices over processes computes the same losses up to
float32 reduction order. A checkpoint restores onto the shardings of whatever mesh the resuming run has.
"""

import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bagjax import launch
from trainutil import (ROOT, checkpoint_steps, launch_cmd, restore_params, run_cmd, train_cmd,
                       train_env, train_losses)

STEPS = 4
ARGS = (f"--config.total_steps={STEPS}", "--config.checkpoint_every_steps=2", f"--config.eval_every_steps={STEPS}",
        "--config.log_every_steps=1", "--config.keep_checkpoints=3", "--config.heatmap_images=0",
        "--config.optimizer.name=sgd", "--config.optimizer.learning_rate=0.02")
# float32 sums in another order (4 devices in 1 vs 2 processes, replicated vs FSDP parameters) differ by rounding.
# SGD at a learning rate where the loss does not overshoot keeps that noise at rounding level (AdamW's normalisation would magnify it for tiny gradients, ~4e-4 after
# 4 steps). Parameters are compared as a whole: |theta - theta_ref| against the distance the reference moved in
# its last two steps (a wrong resume, e.g. lost optimizer state, is of order 100%).
LOSS_RTOL = 2e-4
PARAM_RATIO = 0.05


def test_process_env_sets_rank_coordinator_and_replaces_the_device_count():
    env = launch.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_dump_to=/x", "A": "1"},
                             rank=1, processes=3, devices_per_process=2, coordinator="127.0.0.1:1234")
    assert env["A"] == "1" and env["JAX_PROCESS_ID"] == "1" and env["JAX_NUM_PROCESSES"] == "3"
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234" and env["JAX_PLATFORMS"] == "cpu"
    assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
    assert env["XLA_FLAGS"].split() == ["--xla_dump_to=/x", "--xla_force_host_platform_device_count=2"]


def _launch_script(script: str, processes: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bagjax.launch", f"--processes={processes}", "--", "-c", script],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def _launch_failing(script: str, status: int) -> subprocess.CompletedProcess:
    """Two ranks of which one fails with ``status`` while the other sleeps 300 s: the launcher returns that status
    without waiting for the sleeper (killed, not waited for)."""
    start = time.time()
    proc = _launch_script(script)
    assert proc.returncode == status, proc.stdout + proc.stderr
    assert time.time() - start < 60  # the other rank was killed, not waited for
    return proc


def test_launcher_prefixes_every_line_with_the_rank_and_exits_0():
    proc = _launch_script("import os; r = os.environ['JAX_PROCESS_ID']; print('hello from', r); print('bye', r)", 3)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert sorted(lines) == sorted(f"[{r}] {w} {r}" for r in range(3) for w in ("hello from", "bye")), lines


def test_a_command_without_the_separator_is_refused_with_a_hint(capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch.main(["--processes", "2", "train.py", "--workdir", "w"])
    line = str(exit_info.value.code)
    assert line.startswith("error: unrecognized arguments: train.py --workdir w") and "\n" not in line
    assert "python -m bagjax.launch ... -- train.py --workdir w" in line  # the fix: the command after --


def test_a_failing_process_kills_the_others_and_its_status_is_returned():
    script = ("import os, sys, time; r = int(os.environ['JAX_PROCESS_ID']); print('started', r, flush=True)\n"
              "if r == 1: time.sleep(1); sys.exit(3)\n"
              "time.sleep(300)")
    proc = _launch_failing(script, status=3)
    assert "[1] started 1" in proc.stdout and "[0] started 0" in proc.stdout
    assert "launch: process 1 exited with status 3; killing the other processes" in proc.stdout


def test_a_dead_rank_s_orphaned_child_is_killed_not_waited_on():
    """Rank 1 starts a child that keeps its output pipe open and dies: its whole process group is killed."""
    script = ("import os, subprocess, sys, time; r = int(os.environ['JAX_PROCESS_ID'])\n"
              "if r == 1: subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); sys.exit(4)\n"
              "time.sleep(300)")
    _launch_failing(script, status=4)


@pytest.fixture(scope="module")
def one_by_four(tmp_path_factory):
    """1 process x 4 devices, replicated parameters."""
    workdir = tmp_path_factory.mktemp("one_by_four")
    run_cmd(train_cmd("demo.py:smoke", workdir, *ARGS), train_env(4))
    return workdir


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
    """2 processes x 2 devices through the launcher, FSDP parameters."""
    workdir = tmp_path_factory.mktemp("two_by_two")
    proc = run_cmd(launch_cmd("demo.py:smoke", workdir, *ARGS, "--config.fsdp=True"), train_env())
    return workdir, proc.stdout


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def _assert_params_close(reference_workdir, workdir):
    """The step-4 variables of ``workdir`` match the reference's, relative to how far it moved from step 2."""
    reference, earlier, other = (restore_params(d, s) for d, s in ((reference_workdir, STEPS),
                                                                     (reference_workdir, 2), (workdir, STEPS)))
    for name in ("params", "batch_stats"):
        ref = _flat(reference[name])
        ratio = np.linalg.norm(_flat(other[name]) - ref) / np.linalg.norm(ref - _flat(earlier[name]))
        assert ratio < PARAM_RATIO, f"{name}: |theta - theta_ref| is {ratio:.3f} of the last two steps' distance"


def test_two_processes_by_two_devices_reproduce_one_process_by_four(one_by_four, two_by_two):
    workdir, out = two_by_two
    reference, launched = train_losses(one_by_four), train_losses(workdir)
    assert sorted(reference) == sorted(launched) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([launched[s] for s in reference], list(reference.values()), rtol=LOSS_RTOL)
    assert "[0] final eval: accuracy=" in out and "[1] final eval: accuracy=" in out
    assert "examples=16" in out  # the 16 eval images counted once over both processes, padding masked
    _assert_params_close(one_by_four, workdir)


def _resume_copy(source, target) -> None:
    """A copy of a finished run without its last checkpoint, so a rerun resumes from step 2."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / str(STEPS))


def test_four_device_checkpoint_resumes_on_two_processes_with_fsdp(one_by_four, tmp_path):
    _resume_copy(one_by_four, tmp_path / "run")
    proc = run_cmd(launch_cmd("demo.py:smoke", tmp_path / "run", *ARGS, "--config.fsdp=True"),
                   train_env())
    assert "[0] resuming from step 2" in proc.stdout and "[1] resuming from step 2" in proc.stdout
    assert checkpoint_steps(tmp_path / "run")[-1] == STEPS
    _assert_params_close(one_by_four, tmp_path / "run")


def test_two_process_fsdp_checkpoint_resumes_on_one_device(two_by_two, tmp_path):
    _resume_copy(two_by_two[0], tmp_path / "run")
    proc = run_cmd(train_cmd("demo.py:smoke", tmp_path / "run", *ARGS), train_env(1))
    assert "resuming from step 2" in proc.stdout
    losses = train_losses(tmp_path / "run")
    np.testing.assert_allclose([losses[3], losses[4]], [train_losses(two_by_two[0])[s] for s in (3, 4)],
                               rtol=LOSS_RTOL)
    _assert_params_close(two_by_two[0], tmp_path / "run")
