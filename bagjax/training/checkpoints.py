"""Orbax checkpoints of the train state: periodic, last-N plus best-N, resume, and inference loading.

A checkpoint has four items, ``step``, ``params``, ``batch_stats`` and ``opt_state`` (the optimizer state as
its flat list of leaves, which survives any optax structure), so inference restores only what it needs.
Orbax writes each step to a temporary directory and renames it when complete, so a step that a kill
interrupted is never taken as the latest; a step that is on disk but unreadable is skipped with a warning.

The workdir format lives here too, so the loop writes through one module and readers read through it:
``checkpoints/``, ``config.json`` (the full config) and ``dataset.json`` (class names and split sizes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from bagjax import atomic
from bagjax.errors import PathNotFoundError, UserError
from bagjax.training.state import TrainState

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
DATASET_FILE = "dataset.json"
_ITEMS = ("step", "params", "batch_stats", "opt_state")
# The config keys that decide the shapes of the train state: a checkpoint that does not fit this run's state
# was written by a different config only if one of these changed; otherwise it is damaged.
STATE_KEYS = ("dataset", "num_classes", "model", "head", "model_kwargs", "optimizer", "schedule", "freeze_backbone",
              "fsdp")


class _Damaged(Exception):
    """A step whose metadata does not describe this run's state although the config did not change."""


class ConfigChangedError(UserError):
    """The checkpoints were written by a config whose state has other shapes."""


class CheckpointRestoreError(UserError):
    """No step could be restored; every step was left in place."""


# What orbax and tensorstore say about a step whose files are missing, truncated or garbled.
_DAMAGE_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "does not exist", "Error decoding")


def is_damage(error: BaseException) -> bool:
    """Whether a restore failed because the step's own files are damaged (missing, truncated, unreadable
    metadata), rather than for a reason outside it (memory, a flaky file system, an orbax upgrade)."""
    if isinstance(error, (_Damaged, FileNotFoundError, json.JSONDecodeError, EOFError)):
        return True
    return isinstance(error, (ValueError, OSError, KeyError)) and any(code in str(error) for code in _DAMAGE_CODES)


class DiskFullError(UserError, OSError):
    """Not enough free space for the next checkpoint; nothing was written."""


@contextlib.contextmanager
def quiet_orbax():
    """Silence orbax's and asyncio's log records (tracebacks of a damaged step); bagjax says what happened."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _flat(tree: Any) -> dict[str, Any]:
    return {str(i): leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """``{key path: shape}`` of every leaf, comparable between a saved step's metadata and a target state."""
    return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _items(state: TrainState) -> dict[str, Any]:
    return {"step": {"step": state.step}, "params": state.params, "batch_stats": state.batch_stats,
            "opt_state": _flat(state.opt_state)}


class Checkpoints:
    """Save and restore ``TrainState`` under ``workdir/checkpoints`` with orbax's CheckpointManager."""

    def __init__(self, workdir: str | pathlib.Path, *, keep: int = 2, keep_best: int = 1,
                 read_only: bool = False):
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=max(keep, 1)),
            pp.BestN(get_metric_fn=lambda m: m["eval_accuracy"], n=keep_best, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=not read_only,
                                               read_only=read_only, enable_async_checkpointing=True)
        self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
        # Handlers up front, so item_metadata can describe a step before anything was restored from it.
        self.manager = ocp.CheckpointManager(self.directory, item_names=_ITEMS, options=options,
                                             item_handlers={k: ocp.StandardCheckpointHandler() for k in _ITEMS})

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: TrainState, metrics: dict[str, float] | None = None, *, force: bool = False) -> bool:
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():  # e.g. a preemption right after a periodic save: already on disk
            return False
        self._check_space(state, step)
        items = {k: ocp.args.StandardSave(v) for k, v in _items(state).items()}
        return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

    def _check_space(self, state: TrainState, step: int) -> None:
        """Refuse a save the disk cannot hold before orbax starts it: a write that fails half way floods stderr
        with tracebacks from orbax's background threads. Process 0 decides for all."""
        need = int(sum(leaf.nbytes for leaf in jax.tree.leaves(state)) * 1.2) + (1 << 20)  # + metadata
        free = shutil.disk_usage(self.directory).free
        short = jax.process_index() == 0 and free < need
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            short = bool(multihost_utils.broadcast_one_to_all(np.array(short)))
        if short:
            self.wait()  # a save still in flight finishes (or fails) first, so the message names what is on disk
            raise DiskFullError(f"disk full: {free / 2**20:.1f} MiB free in {self.directory} but the checkpoint of "
                                f"step {step} needs about {need / 2**20:.1f} MiB; nothing was written and "
                                f"{kept_checkpoints(self.directory.parent)} are intact: free space (or lower "
                                "keep_checkpoints) and rerun the same command")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def restore_latest(self, abstract_state: TrainState, changed: list[str] | None = None) -> TrainState | None:
        """The newest readable step restored onto ``abstract_state``'s shardings, or None if there is none.

        ``changed``: the ``STATE_KEYS`` this run's config changed against the workdir's config.json (None: no
        config.json). A step is damaged when orbax finds its files missing, truncated or unreadable, or when it
        does not fit the state although no such key changed; the previous step is then tried, and once one
        restores, the damaged newer ones are set aside with a one-line warning each. Any other failure (memory, a
        flaky file system, an orbax upgrade), or no step restoring at all, stops with CheckpointRestoreError and
        leaves every step in place: a systemic failure must not rename a workdir's every step.
        """
        target = _items(abstract_state)
        steps = self.all_steps()
        damaged: list[tuple[int, str]] = []
        for step in reversed(steps):
            try:
                with quiet_orbax():
                    self._check_fits(step, target, changed)
                    restored = self.manager.restore(
                        step, args=ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in target.items()}))
            except ConfigChangedError:
                raise
            except Exception as e:  # orbax raises many types; only some mean "this step's files are damaged"
                reason = " ".join(str(e).split())[:200] or type(e).__name__
                if not is_damage(e):
                    raise CheckpointRestoreError(
                        f"cannot restore checkpoint step {step} in {self.directory} ({type(e).__name__}: {reason}), "
                        f"which is not a damaged file: every step is left in place (steps {steps}); fix the cause "
                        "(memory, the file system, the orbax version) and rerun the same command") from None
                damaged.append((step, reason))
                continue
            for bad, reason in damaged:
                with quiet_orbax():
                    aside = self._set_aside(bad)
                print(f"warning: checkpoint step {bad} is corrupt or incomplete ({reason}; moved to {aside}), "
                      f"resuming from step {step}", flush=True)
            opt_leaves = [restored["opt_state"][str(i)] for i in range(len(restored["opt_state"]))]
            opt_state = jax.tree.unflatten(jax.tree.structure(abstract_state.opt_state), opt_leaves)
            return TrainState(step=restored["step"]["step"], params=restored["params"],
                              batch_stats=restored["batch_stats"], opt_state=opt_state)
        if damaged:
            raise CheckpointRestoreError(
                f"no checkpoint in {self.directory} can be restored ("
                + "; ".join(f"step {s}: {r[:120]}" for s, r in damaged)
                + "): every step is left in place; restore them from a backup, or move the checkpoints/ folder "
                "away to train from scratch")
        return None

    def _check_fits(self, step: int, target: dict[str, Any], changed: list[str] | None) -> None:
        """Raise ConfigChangedError if a step holds another model because the config changed, _Damaged if it does
        not fit although the config is the same (e.g. a deleted ``_METADATA``)."""
        try:
            metadata = self.manager.item_metadata(step)
            saved = {k: _shapes(getattr(metadata[k], "tree", metadata[k])) for k in ("params", "opt_state")}
        except Exception:  # unreadable metadata: restore will fail and the step is set aside as corrupt
            return
        if saved == {k: _shapes(target[k]) for k in ("params", "opt_state")}:
            return
        if changed == []:
            raise _Damaged(f"its metadata does not fit the state of the unchanged {CONFIG_FILE}")
        what = f" ({', '.join(changed)} changed)" if changed else ""
        raise ConfigChangedError(f"the checkpoints in {self.directory} were written by a different model or "
                                 f"optimizer config than this run's{what}: use a new --workdir, or the config in its "
                                 "config.json")

    def _set_aside(self, step: int) -> pathlib.Path:
        """Rename an unreadable step to ``corrupt-STEP`` (kept for inspection), so training can save that step again."""
        target = self.directory / f"corrupt-{step}"
        if jax.process_index() == 0:
            n = 1
            while target.exists():
                target, n = self.directory / f"corrupt-{step}-{n}", n + 1
            (self.directory / str(step)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"bagjax_set_aside_{step}")
        self.manager.reload()
        return target

    def restore_variables(self, step: int | None = None) -> dict[str, Any]:
        """``{'params', 'batch_stats'}`` of a step (default: the best by eval accuracy, else the latest), as numpy."""
        if step is None:
            step = self.manager.best_step()
            if step is None:
                step = self.manager.latest_step()
        if step is None:
            raise PathNotFoundError(f"no checkpoint in {self.directory}: train first (python train.py ...)")
        # Onto this process's first device, whatever mesh the checkpoint was saved from (4 GPUs, 2 hosts, ...).
        metadata = self.manager.item_metadata(step)
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

        def target(name):
            return ocp.args.StandardRestore(jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata[name]))

        restored = self.manager.restore(step, args=ocp.args.Composite(params=target("params"),
                                                                      batch_stats=target("batch_stats")))
        return jax.tree.map(np.asarray, {"params": restored["params"], "batch_stats": restored["batch_stats"]})


def read_variables(workdir: str | pathlib.Path, step: int | None = None) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` of a workdir's step (default: best, else latest), without touching the workdir."""
    with quiet_orbax():  # orbax warns that a read-only manager is read-only
        ckpt = Checkpoints(workdir, read_only=True)
        try:
            return ckpt.restore_variables(step)
        except FileNotFoundError:
            raise
        except Exception as e:  # orbax raises many types for damaged files
            raise UserError(f"the checkpoint in {ckpt.directory} is unreadable ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]}): resume training on the workdir with train.py, "
                            "which sets damaged steps aside") from None
        finally:
            ckpt.close()


def write_config(workdir: str | pathlib.Path, config: ml_collections.ConfigDict) -> None:
    atomic.write_text(pathlib.Path(workdir) / CONFIG_FILE, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def changed_keys(workdir: str | pathlib.Path, config: ml_collections.ConfigDict) -> list[str] | None:
    """The ``STATE_KEYS`` whose value in ``config`` differs from the workdir's config.json (None: none saved)."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    now = json.loads(config.to_json_best_effort())
    return [k for k in STATE_KEYS if saved.get(k) != now.get(k)]


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a workdir was trained with (its ``config.json``)."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise PathNotFoundError(f"{path} not found: {workdir} is not a bagjax training workdir")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text()))
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): restore it, or rerun train.py with the same config "
                        "on the workdir, which writes it again") from None


def write_dataset_info(workdir: str | pathlib.Path, class_names: tuple[str, ...], num_train: int,
                       num_eval: int, fingerprint: dict[str, Any] | None = None) -> None:
    """``dataset.json``: the class names and split sizes a workdir was trained with, and the data's fingerprint
    (bagjax.data.fingerprint), which a resume compares with its own."""
    info = {"class_names": list(class_names), "num_classes": len(class_names), "num_train": num_train,
            "num_eval": num_eval, **({"fingerprint": fingerprint} if fingerprint else {})}
    atomic.write_text(pathlib.Path(workdir) / DATASET_FILE, json.dumps(info, indent=2) + "\n")


def saved_fingerprint(workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """The dataset fingerprint in a workdir's ``dataset.json``; None when there is none (an older workdir)."""
    try:
        saved = json.loads((pathlib.Path(workdir) / DATASET_FILE).read_text())
    except (OSError, ValueError):
        return None
    return saved.get("fingerprint") if isinstance(saved, dict) else None


def read_dataset_info(workdir: str | pathlib.Path) -> dict[str, Any]:
    """A workdir's ``dataset.json`` (class names and split sizes); a missing or broken file is one line."""
    path = pathlib.Path(workdir) / DATASET_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PathNotFoundError(f"{path} is missing: rerun train.py with the same config on {workdir}, "
                                "which writes it again") from None
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e}): rerun train.py with the same config on {workdir}, "
                        "which writes it again") from None


def finished_steps(workdir: str | pathlib.Path) -> list[int]:
    """The complete checkpoint steps on disk, read without orbax: a step's directory gets its number only once
    orbax has finished writing it, so a half-written step is never among them."""
    directory = pathlib.Path(workdir) / CHECKPOINT_DIR
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def kept_checkpoints(workdir: str | pathlib.Path) -> str:
    """'the checkpoints up to step N' or 'no checkpoint', for the disk-full messages."""
    steps = finished_steps(workdir)
    return f"the checkpoints up to step {steps[-1]}" if steps else "no checkpoint"


def is_workdir(path: str | pathlib.Path) -> bool:
    return (pathlib.Path(path) / CONFIG_FILE).exists() and (pathlib.Path(path) / CHECKPOINT_DIR).is_dir()
