"""Checkpoints.restore_latest sets a step aside only for damage: a failure that is not damage, or no step restoring
at all, stops in one line with every step left in place (a tiny train state, in-process)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bagjax.training import checkpoints
from bagjax.training.state import TrainState
from trainutil import checkpoint_steps

TX = optax.sgd(0.1, momentum=0.9)


def _state(step: int) -> TrainState:
    params = {"w": jnp.full((3, 4), float(step)), "b": jnp.zeros((4,))}
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params, batch_stats={"mean": jnp.ones((2,))},
                      opt_state=TX.init(params))


@pytest.fixture
def workdir(tmp_path):
    ckpt = checkpoints.Checkpoints(tmp_path, keep=5)
    for step in (1, 2, 3):
        ckpt.save(_state(step), force=True)
    ckpt.wait()
    ckpt.close()
    return tmp_path


def _restore(workdir, **patches):
    ckpt = checkpoints.Checkpoints(workdir, keep=5)
    for name, value in patches.items():
        setattr(ckpt.manager, name, value)
    try:
        return ckpt.restore_latest(jax.eval_shape(lambda: _state(0)), changed=[])
    finally:
        ckpt.close()


def _truncate(step_dir):
    for path in step_dir.rglob("*"):
        if path.is_file():
            os.truncate(path, path.stat().st_size // 2)


def test_a_restore_failure_that_is_not_damage_leaves_every_step_in_place(workdir):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8.00GiB")

    with pytest.raises(checkpoints.CheckpointRestoreError) as err:
        _restore(workdir, restore=out_of_memory)
    message = str(err.value)
    assert "\n" not in message and "step 3" in message and "RESOURCE_EXHAUSTED" in message
    assert "every step is left in place" in message and "[1, 2, 3]" in message
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2", "3"]


def test_damaged_newest_step_is_set_aside_once_an_older_one_restores(workdir, capsys):
    _truncate(workdir / "checkpoints" / "3")
    state = _restore(workdir)
    assert int(state.step) == 2 and np.all(np.asarray(state.params["w"]) == 2.0)
    assert "checkpoint step 3 is corrupt or incomplete" in capsys.readouterr().out
    assert checkpoint_steps(workdir) == [1, 2] and (workdir / "checkpoints" / "corrupt-3").is_dir()


def test_no_step_restoring_stops_in_one_line_and_renames_nothing(workdir):
    for step in (1, 2, 3):
        _truncate(workdir / "checkpoints" / str(step))
    with pytest.raises(checkpoints.CheckpointRestoreError) as err:
        _restore(workdir)
    message = str(err.value)
    assert "\n" not in message and all(f"step {s}:" in message for s in (1, 2, 3))
    assert "every step is left in place" in message
    assert checkpoint_steps(workdir) == [1, 2, 3] and not list((workdir / "checkpoints").glob("corrupt-*"))
