"""Running ``train.py`` as a user does, in a subprocess, for the end-to-end tests."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def train_env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
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
