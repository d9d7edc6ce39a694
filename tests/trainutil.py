"""Running ``train.py`` as a user does, in a subprocess, for the end-to-end tests."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One persistent JAX compilation cache for every train.py the tests start: many tests train the same smoke
# models, and the cache key is the compiled program itself, so a stale entry can never be used.
SHARED_CACHE = pathlib.Path(tempfile.gettempdir()) / "bagjax-tests-jax-cache"


def train_env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=str(SHARED_CACHE), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
    return env


def train_cmd(config: str, workdir, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / config}",
            f"--workdir={workdir}", *overrides]


def run_train(config: str, workdir, *overrides: str, devices: int = 1, check: bool = True,
              timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(config, workdir, *overrides), cwd=ROOT, env=train_env(devices),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def read_metrics(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


# ---- helpers of the multi-process and fault-tolerance tests (test_launch.py, test_fault_tolerance.py)
def cached_env(env: dict[str, str], cache_dir) -> dict[str, str]:
    """``env`` with its own persistent JAX compilation cache (e.g. to check that nothing was compiled)."""
    return dict(env, JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def launch_cmd(config: str, workdir, *overrides: str, processes: int = 2, devices_per_process: int = 2) -> list[str]:
    """``python -m bagjax.launch ... -- train.py ...``: the local multi-process launcher around train.py."""
    return [sys.executable, "-m", "bagjax.launch", f"--processes={processes}",
            f"--devices-per-process={devices_per_process}", "--", *train_cmd(config, workdir, *overrides)[1:]]


def run_cmd(cmd: list[str], env: dict[str, str], *, check: bool = True,
            timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command from the repository root; with ``check`` a failure shows the end of its output."""
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def checkpoint_steps(workdir) -> list[int]:
    """The finished checkpoint steps on disk (orbax renames a step's temporary directory when it is complete)."""
    from bagjax.training.checkpoints import finished_steps

    return finished_steps(workdir)


def restore_params(workdir, step: int) -> dict:
    """``{'params', 'batch_stats'}`` of one checkpoint step of a workdir, as numpy arrays."""
    from bagjax.training.checkpoints import read_variables

    return read_variables(workdir, step)


def train_losses(workdir) -> dict[int, float]:
    """The last logged train loss of every step in ``metrics.jsonl`` (a resumed run logs its steps again)."""
    return {m["step"]: m["train_loss"] for m in read_metrics(workdir) if "train_loss" in m}


def file_and_moved_workdir(workdir, tmp_path, dataset: str) -> tuple[pathlib.Path, pathlib.Path]:
    """A file where a results folder would go, and a copy of ``workdir`` whose config.json names ``dataset``
    (a dataset that is gone): the bad input of the experiment commands' up-front checks."""
    import shutil

    afile = pathlib.Path(tmp_path) / "afile"
    afile.write_text("keep me")
    moved = pathlib.Path(tmp_path) / "moved"
    shutil.copytree(workdir, moved)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "dataset": dataset}))
    return afile, moved
