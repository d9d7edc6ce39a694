"""Precise BatchNorm: running statistics recomputed for the current weights, and a guard that checks them.

A BatchNorm's running mean and variance are an exponential average over past weights. With the official
momenta (BagNet's stem keeps 0.999 of the old value, about a 1,000-step memory) a short run ends with
statistics of weights it no longer has, and eval mode is then far worse than the weights are. Precise BN
(Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021, section 3; pycls ``compute_precise_bn_stats`` and
detectron2 ``update_bn_stats``) recomputes them with the weights frozen: every BatchNorm's statistics are the
equal-weight average of the per-batch mean and (biased) variance over ``num_batches`` training batches
(a BatchNorm whose moments come out non-finite, because the weights overflow, keeps its previous statistics).

Each batch's moments come from a train-mode forward of the whole model with every BatchNorm momentum set to 0
(``bn_momentum=0.0``, so the "running" statistics it writes are exactly that batch's), jitted over the
global batch: sharded or multi-process, they are the statistics of the global batch, as in one process.
The batches are the training batches of the ``num_batches`` steps before ``step``, a function of
(seed, step), so a resumed run recomputes the same statistics as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bagjax import data

# The guard warns when batch statistics beat the running ones by more than this (accuracy, 0..1).
GUARD_MARGIN = 0.05


def statistics_batches(config: ml_collections.ConfigDict, step: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the training batches of steps ``step - num_batches .. step - 1`` (fewer at
    the start of a run are taken from later steps): the one place precise BN gets its data from."""
    n = config.precise_bn.num_batches
    with contextlib.closing(data.train_batches(config, start_step=max(step - n, 0))) as batches:
        yield from itertools.islice(batches, n)


def batch_moments(variables: Any, batch: dict[str, jax.Array], *, model: nn.Module) -> Any:
    """Every BatchNorm's mean and biased variance on one (global) batch, as a ``batch_stats`` tree."""
    images = data.normalize(batch["image"])  # uint8 from the host, normalized as in loop.train_step
    _, updates = model.clone(bn_momentum=0.0).apply(variables, images, train=True, mutable=["batch_stats"])
    return updates["batch_stats"]


def accumulate(total: Any, state: Any, batch: dict[str, jax.Array], *, model: nn.Module, num_batches: int) -> Any:
    """``total`` plus the batch's moments / ``num_batches``, as pycls adds ``running_mean / num_iters`` (jit this
    with ``total`` donated)."""
    return jax.tree.map(lambda t, m: t + m / num_batches, total, batch_moments(state.variables, batch, model=model))


def recompute(p_accumulate: Callable, state: Any, batches: Iterator[dict[str, jax.Array]]) -> tuple[Any, int]:
    """The equal-weight average of the batch moments over ``batches`` (global arrays, as many as the
    ``num_batches`` ``p_accumulate`` divides by): the new ``batch_stats``, and how many BatchNorms got
    non-finite moments (weights whose activations overflow) and so keep their previous statistics."""
    total = jax.tree.map(jnp.zeros_like, state.batch_stats)
    for batch in batches:
        total = p_accumulate(total, state, batch)
    stats, kept = _keep_finite(total, state.batch_stats)
    return stats, int(kept)


@jax.jit
def _keep_finite(new: Any, old: Any) -> tuple[Any, jax.Array]:
    """Per BatchNorm (its mean and var together, never one without the other): the new statistics where both
    are finite, else the old ones; and the count of BatchNorms kept."""
    def is_bn(node):
        return isinstance(node, dict) and set(node) == {"mean", "var"}

    finite = jax.tree.map(lambda n: jnp.isfinite(n["mean"]).all() & jnp.isfinite(n["var"]).all(), new, is_leaf=is_bn)
    stats = jax.tree.map(lambda n, o, ok: jax.tree.map(lambda a, b: jnp.where(ok, a, b), n, o), new, old, finite,
                         is_leaf=is_bn)
    return stats, sum(jnp.logical_not(ok).astype(jnp.int32) for ok in jax.tree.leaves(finite))


def enabled(config: ml_collections.ConfigDict, state: Any) -> bool:
    """Precise BN runs unless switched off, the backbone is frozen (it keeps its converted statistics), or
    the model has no BatchNorm."""
    return config.precise_bn.num_batches > 0 and not config.freeze_backbone and bool(jax.tree.leaves(state.batch_stats))


# ----------------------------------------------------------------------------------------------- the guard
def guard_step(state: Any, batch: dict[str, jax.Array], *, model: nn.Module) -> dict[str, jax.Array]:
    """Correct predictions of one eval batch with the running statistics (eval mode) and with the batch's own
    statistics (train-mode BatchNorm, nothing updated), and the count of real examples."""
    images, labels, mask = data.normalize(batch["image"]), batch["label"], batch["mask"].astype(jnp.float32)
    running, _ = model.apply(state.variables, images, train=False)
    (own, _), _ = model.apply(state.variables, images, train=True, mutable=["batch_stats"])
    return {"correct": jnp.sum((jnp.argmax(running, -1) == labels) * mask),
            "correct_batch_stats": jnp.sum((jnp.argmax(own, -1) == labels) * mask),
            "count": jnp.sum(mask)}


def guard_batches(config: ml_collections.ConfigDict, num_eval: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's share of the first ``precise_bn.guard_batches`` eval batches that hold no padding (padding
    would enter the batch statistics), or of the first batch when the split is smaller than one batch. The
    choice depends only on the split size, so every process takes the same global batches."""
    n = max(min(config.precise_bn.guard_batches, num_eval // config.eval_batch_size), 1)
    with contextlib.closing(data.eval_batches(config)) as batches:
        yield from itertools.islice(batches, n)


def guard(p_guard_step: Callable, state: Any, batches: Iterator[dict[str, jax.Array]]) -> dict[str, float]:
    """``guard_eval_accuracy`` (running statistics) and ``guard_batch_stats_accuracy`` on the same batches."""
    totals: dict[str, float] = {}
    for batch in batches:
        for k, v in jax.device_get(p_guard_step(state, batch)).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.get("count", 0.0), 1.0)
    return {"guard_eval_accuracy": totals.get("correct", 0.0) / count,
            "guard_batch_stats_accuracy": totals.get("correct_batch_stats", 0.0) / count,
            "guard_count": int(totals.get("count", 0.0))}


def guard_warning(metrics: dict[str, float], config: ml_collections.ConfigDict) -> str | None:
    """One line when batch statistics beat the running statistics by more than ``GUARD_MARGIN``, else None."""
    running, own = metrics["guard_eval_accuracy"], metrics["guard_batch_stats_accuracy"]
    if own - running <= GUARD_MARGIN:
        return None
    fix = ("raise --config.precise_bn.num_batches" if config.precise_bn.num_batches > 0
           else "turn precise BN on with --config.precise_bn.num_batches=32")
    return (f"warning: with batch statistics the eval accuracy is {own:.1%}, with the BatchNorm running statistics "
            f"{running:.1%} (same {metrics['guard_count']} images): the running statistics do not match the "
            f"weights, so eval mode understates the model; {fix} (README: eval accuracy far below train accuracy)")
