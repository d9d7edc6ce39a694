"""Shared test settings: keep JAX on the CPU with float32 and quiet TensorFlow logs."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
    """One ``demo.py:smoke`` training workdir for every test that only reads one (copy it before changing it)."""
    from trainutil import run_train

    workdir = tmp_path_factory.mktemp("smoke") / "run"
    run_train("demo.py:smoke", workdir, "--config.heatmap_images=0")
    return workdir
