"""What the training loop runs besides its steps, as small objects (big_vision's evaluators and flax's hooks).

- ``FiniteCheck``: the NaN guard of training. Each step returns a finiteness flag; they are looked at only where
  the loop syncs with the host anyway (logging, eval, checkpoints), so the guard never stalls the device.
- ``check_finite_eval``: the NaN guard of eval: a model whose eval loss is not finite is not saved.
- ``PreciseBN``: BatchNorm statistics recomputed for the current weights before each eval (``precise_bn``).
- ``BNGuard``: at the end, eval mode against batch statistics on a few eval batches; one warning line if far apart.
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import Any, Callable

import jax
import ml_collections

from bagjax.errors import UserError
from bagjax.training import precise_bn, sharding

_FIX = "Lower optimizer.learning_rate, set optimizer.grad_clip_norm, or set skip_nonfinite_updates=True"


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the gradients stopped being finite."""


class FiniteCheck:
    """Collects each step's finiteness flag (a device array) and raises at the first non-finite one on ``check``."""

    def __init__(self, skip_nonfinite: bool, directory: pathlib.Path):
        self.skip_nonfinite, self.directory = skip_nonfinite, directory
        self.pending: list[tuple[int, jax.Array]] = []  # (step, finite flag) not yet looked at

    def add(self, step: int, finite: jax.Array) -> None:
        self.pending.append((step, finite))

    def check(self) -> None:
        flags = jax.device_get([f for _, f in self.pending])
        bad = [s for (s, _), ok in zip(self.pending, flags) if not ok]
        self.pending.clear()
        if bad and not self.skip_nonfinite:
            raise NonFiniteLossError(f"non-finite loss or gradients at step {bad[0]}: stopped; the last good "
                                     f"checkpoint is kept in {self.directory}. {_FIX}")


def check_finite_eval(eval_metrics: dict[str, float], step: int, directory: pathlib.Path,
                      skip_nonfinite: bool = False) -> None:
    """The NaN guard of eval: a model whose eval loss is not finite is reported, not saved (with
    ``skip_nonfinite_updates`` the run goes on, with a warning)."""
    if math.isfinite(eval_metrics["eval_loss"]):
        return
    if skip_nonfinite:
        print(f"warning: non-finite eval loss at step {step} (skip_nonfinite_updates=True: going on)", flush=True)
    else:
        raise NonFiniteLossError(f"non-finite eval loss at step {step}: stopped without saving it; the last good "
                                 f"checkpoint is kept in {directory}. {_FIX}")


class PreciseBN:
    """``state -> (state with precise BatchNorm statistics, {'precise_bn_seconds', ...})`` (``precise_bn.py``)."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Any, p_accumulate: Callable, is_main: bool):
        self.config, self.mesh, self.p_accumulate, self.is_main = config, mesh, p_accumulate, is_main

    def __call__(self, state: Any, step: int) -> tuple[Any, dict[str, float]]:
        if not precise_bn.enabled(self.config, state):
            return state, {}
        start = time.perf_counter()
        batches = (sharding.global_batch(b, self.mesh) for b in precise_bn.statistics_batches(self.config, step))
        stats, kept = jax.block_until_ready(precise_bn.recompute(self.p_accumulate, state, batches))
        if kept and self.is_main:
            print(f"warning: precise BN at step {step}: {kept} BatchNorm layer(s) got non-finite statistics with these "
                  "weights and keep their previous ones", flush=True)
        return state.replace(batch_stats=stats), {"precise_bn_seconds": time.perf_counter() - start,
                                                  **({"precise_bn_kept_layers": kept} if kept else {})}


class BNGuard:
    """``state -> {'guard_eval_accuracy', 'guard_batch_stats_accuracy', 'guard_count'}``, warning once if far apart."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Any, p_guard_step: Callable, num_eval: int,
                 is_main: bool):
        self.config, self.mesh, self.p_guard_step = config, mesh, p_guard_step
        self.num_eval, self.is_main = num_eval, is_main

    def __call__(self, state: Any) -> dict[str, float]:
        batches = (sharding.global_batch(b, self.mesh) for b in precise_bn.guard_batches(self.config, self.num_eval))
        metrics = precise_bn.guard(self.p_guard_step, state, batches)
        if self.is_main and (warning := precise_bn.guard_warning(metrics, self.config)):
            print(warning, flush=True)
        return metrics
