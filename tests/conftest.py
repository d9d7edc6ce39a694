"""Shared test settings: keep JAX on the CPU with float32 and quiet TensorFlow logs."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402


def _smoke_run(tmp_path_factory, config: str):
    """``config:smoke`` trained once into ``<tmp>/run``; train.py's stdout is kept beside it in ``stdout.txt``."""
    from trainutil import run_train

    workdir = tmp_path_factory.mktemp("smoke") / "run"
    (workdir.parent / "stdout.txt").write_text(run_train(f"{config}:smoke", workdir).stdout)
    return workdir


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory):
    """One ``demo.py:smoke`` training workdir for every test that only reads one (copy it before changing it)."""
    return _smoke_run(tmp_path_factory, "demo.py")


@pytest.fixture(scope="session")
def anchornet_smoke_workdir(tmp_path_factory):
    """One ``anchornet_demo.py:smoke`` training workdir, likewise (AnchorNet's training step compiles slowly)."""
    return _smoke_run(tmp_path_factory, "anchornet_demo.py")
