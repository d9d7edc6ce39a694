"""Patch "blackout", the computation: evidence masks, their accuracy, and the FLOPs of sparse evaluation.

Zou, Yan & Liu, "CNN Image Recognition Architecture Simplification using Patch-Based Data Reduction
Techniques" (sections 5-6, Table 1): evaluate a trained BagNet while ignoring part of its evidence, either
every other patch ("alternating") or a random 25%, 50% or 75% of patches.

The tables, plots and command line are in ``bagjax.experiments.blackout``.

Two modes, because the paper's text and its public code disagree:

- ``--mode patches`` (default, the paper's text, section 5): a BagNet's image logits are the mean of its patch
  logits (Brendel & Bethge 2019, section 3), so blacking out patches means the image logits become the mean over
  the KEPT patches only. Random masks are drawn per image (from the seed and the example's index).
- ``--mode channels`` (the paper's public code): it zeroed columns of the final fc weight, which removes
  feature channels, not patches: ``logits = mean_features @ (W * m) + b`` with a channel mask ``m`` over the
  ``n_c`` (2048 for the full BagNets) features, no renormalisation and the bias kept. One mask per seed is
  shared by the whole eval split, as a zeroed weight is. "Alternating" keeps every other channel. This needs a
  head that is linear per location (``learned`` or ``identity``). It is offered to reproduce the paper's numbers;
  it answers a different question (how many feature channels the classifier needs), not the text's.

Beyond the paper: a keep-fraction sweep (at least one unit is always kept) with random masks against a
"top-evidence" policy that keeps the units contributing most to the class the unmasked model predicts, ``ŷ``:
the patch logit of ``ŷ`` per patch (patches) or ``h_c W[c, ŷ]`` per channel (channels). This policy peeks at
the model's own evidence, so it is an upper reference for evidence selection, not a fair random control.

Accuracy and cross-entropy under every scheme come from ONE dense forward pass per batch (``patch_logits`` or
``features``); the masks are applied to those outputs. ``compute_table`` measures when evaluating only the kept
patches (``bagjax.patches.per_patch_logits``) is cheaper than the dense pass: overlapping receptive fields are
recomputed per patch, so sparse evaluation only pays off when few patches are kept.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from bagjax import data, patches
from bagjax.models import create_model
from bagjax.models.heads import Head
from bagjax.training.loop import cross_entropy
from bagjax.errors import UserError

MODES = ("patches", "channels")
POLICIES = ("none", "alternating", "random", "top")
PAPER_DROPS = (0.25, 0.5, 0.75)  # Table 1: random 25%, 50% and 75% "blackout"
SWEEP_KEEPS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
COMPUTE_MODELS = ("bagnet9", "bagnet17", "bagnet33")
COMPUTE_KEEPS = (0.0, 0.05, 0.25, 1.0)
LINEAR_HEADS = ("learned", "identity")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One way of blacking out evidence: a policy, the fraction of units (patches or channels) kept, a seed."""

    policy: str
    keep: float
    seed: int = 0

    @property
    def drop(self) -> float:
        return 1.0 - self.keep


def num_kept(keep: float, num_units: int) -> int:
    """Units kept at a keep fraction: round half up, and never fewer than one."""
    return max(1, min(num_units, int(np.floor(keep * num_units + 0.5))))


def scheme_kept(scheme: Scheme, shape: tuple[int, ...]) -> int:
    """How many units a scheme keeps on a grid (or channel axis) of ``shape``."""
    if scheme.policy == "alternating":
        return int(alternating_mask(shape).sum())
    return num_kept(scheme.keep, int(np.prod(shape)))


def make_schemes(seeds: int, sweep_keeps: Sequence[float] = SWEEP_KEEPS) -> list[Scheme]:
    """No blackout, alternating, and random (``seeds`` seeds) plus top-evidence at every keep fraction.

    The keep fractions are the sweep's together with Table 1's (random 25/50/75% dropped).
    """
    if seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {seeds}")
    bad = [k for k in sweep_keeps if not 0.0 <= k < 1.0]
    if bad:
        raise UserError(f"keep fractions must lie in [0, 1) (1 is the no-blackout scheme), got {bad}")
    keeps = sorted({round(k, 6) for k in sweep_keeps} | {round(1.0 - d, 6) for d in PAPER_DROPS})
    schemes = [Scheme("none", 1.0), Scheme("alternating", 0.5)]
    schemes += [Scheme("random", k, s) for k in keeps for s in range(seeds)]
    schemes += [Scheme("top", k) for k in keeps]
    return schemes


# ----------------------------------------------------------------------------------------------- masks
def alternating_mask(shape: tuple[int, ...]) -> np.ndarray:
    """Checkerboard keep-mask: index sum even, i.e. ``(i + j) % 2 == 0`` on a patch grid, every other channel in 1-D."""
    return np.indices(shape).sum(axis=0) % 2 == 0


def top_k_mask(scores: jax.Array, k: int) -> jax.Array:
    """Keep the ``k`` highest scores along the last axis (ties: the lower index wins)."""
    ranks = jnp.argsort(jnp.argsort(-scores, axis=-1, stable=True), axis=-1)
    return ranks < k


def random_mask(seed: int, example_index: jax.Array, num_units: int, k: int) -> jax.Array:
    """Exactly ``k`` of ``num_units`` units kept at random per example: ``(B,) -> (B, num_units)``.

    Each example's mask depends only on (seed, its index in the split), not on the batch size.
    """
    key = jax.random.key(seed)
    draw = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (num_units,)))
    return top_k_mask(draw(example_index), k)


def patch_mask(scheme: Scheme, patch_logits: jax.Array, example_index: jax.Array) -> jax.Array:
    """Keep-mask ``(B, H', W')`` of a scheme over a batch's patch grid (blackout paper section 5)."""
    b, gh, gw, _ = patch_logits.shape
    n = gh * gw
    k = num_kept(scheme.keep, n)
    if scheme.policy == "none":
        return jnp.ones((b, gh, gw), bool)
    if scheme.policy == "alternating":
        return jnp.broadcast_to(jnp.asarray(alternating_mask((gh, gw))), (b, gh, gw))
    if scheme.policy == "random":
        return random_mask(scheme.seed, example_index, n, k).reshape(b, gh, gw)
    if scheme.policy == "top":
        predicted = jnp.argmax(patch_logits.mean(axis=(1, 2)), axis=-1)
        evidence = jnp.take_along_axis(patch_logits, predicted[:, None, None, None], axis=-1)
        return top_k_mask(evidence.reshape(b, n), k).reshape(b, gh, gw)
    raise UserError(f"unknown blackout policy {scheme.policy!r}: choose one of {', '.join(POLICIES)}")


def kept_patch_logits(patch_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Image logits as the mean over the kept patches only: ``(B, H', W', C), (B, H', W') -> (B, C)``.

    The paper (section 5) sets the blacked-out patches' weights to 0 "so that they are not considered in the final
    aggregation"; dividing by the kept count rather than by all patches gives the same predictions (a positive
    factor), and a cross-entropy that does not grow just because fewer patches vote.
    """
    m = mask.astype(patch_logits.dtype)
    return jnp.einsum("bhwc,bhw->bc", patch_logits, m) / jnp.sum(m, axis=(1, 2))[:, None]


def channel_mask(scheme: Scheme, contributions: jax.Array) -> jax.Array:
    """Keep-mask ``(B, n_c)`` over feature channels (the paper code's zeroed fc columns).

    ``contributions`` is ``h_c W[c, ŷ]`` per channel, used by the top-evidence policy. A random mask is one per
    seed for the whole split (a zeroed weight), so every example gets the same one.
    """
    b, n = contributions.shape
    k = num_kept(scheme.keep, n)
    if scheme.policy == "none":
        return jnp.ones((b, n), bool)
    if scheme.policy == "alternating":
        return jnp.broadcast_to(jnp.asarray(alternating_mask((n,))), (b, n))
    if scheme.policy == "random":
        return jnp.broadcast_to(random_mask(scheme.seed, jnp.zeros((1,), jnp.int32), n, k), (b, n))
    if scheme.policy == "top":
        return top_k_mask(contributions, k)
    raise UserError(f"unknown blackout policy {scheme.policy!r}: choose one of {', '.join(POLICIES)}")


# ----------------------------------------------------------------------------------------------- heads
def head_function(model: nn.Module, variables: Any) -> Callable[[jax.Array], jax.Array]:
    """The model's classifier head alone, ``(..., n_c) -> (..., C)``, for channel blackout."""
    head = Head(model.head, model.num_classes, model.dtype)
    head_vars = {"params": variables["params"].get("head", {})}
    return lambda x: head.apply(head_vars, x)


def check_channel_mode(model: nn.Module) -> None:
    if getattr(model, "head", None) not in LINEAR_HEADS:
        raise UserError(f"--mode channels zeroes fc weight columns and needs a linear head "
                        f"({', '.join(LINEAR_HEADS)}), "
                        f"but the model's head is {getattr(model, 'head', None)!r}: use --mode patches")


def linear_head_weight(head: Callable[[jax.Array], jax.Array], num_features: int) -> jax.Array:
    """``W`` of a head that is affine per location (``head(x) = x W + b``): ``(n_c, C)``."""
    return head(jnp.eye(num_features)) - head(jnp.zeros((1, num_features)))


# ----------------------------------------------------------------------------------------------- metrics
def _sums(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
    v = valid.astype(jnp.float32)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * v)
    return correct, jnp.sum(cross_entropy(logits, labels) * v)


def patch_scheme_sums(patch_logits: jax.Array, labels: jax.Array, valid: jax.Array, example_index: jax.Array,
                      schemes: Sequence[Scheme]) -> tuple[jax.Array, jax.Array]:
    """Correct and cross-entropy sums ``(S,), (S,)`` of every scheme, from one batch's dense patch logits."""
    sums = [_sums(kept_patch_logits(patch_logits, patch_mask(s, patch_logits, example_index)), labels, valid)
            for s in schemes]
    return jnp.stack([c for c, _ in sums]), jnp.stack([l for _, l in sums])


def channel_scheme_sums(mean_features: jax.Array, labels: jax.Array, valid: jax.Array,
                        head: Callable[[jax.Array], jax.Array], schemes: Sequence[Scheme]
                        ) -> tuple[jax.Array, jax.Array]:
    """Like ``patch_scheme_sums`` with channel masks: ``logits = head(h * m) = (h * m) W + b`` (bias kept)."""
    predicted = jnp.argmax(head(mean_features), axis=-1)
    weight = linear_head_weight(head, mean_features.shape[-1])
    contributions = mean_features * weight[:, predicted].T
    sums = [_sums(head(mean_features * channel_mask(s, contributions)), labels, valid) for s in schemes]
    return jnp.stack([c for c, _ in sums]), jnp.stack([l for _, l in sums])


def blackout_step(model: nn.Module, schemes: Sequence[Scheme], mode: str) -> Callable:
    """A jitted ``(variables, images, labels, valid, index) -> (correct (S,), loss (S,))``: one dense pass."""

    def step(variables, images, labels, valid, index):
        images = data.normalize(images)  # uint8 eval batches, normalized on the device
        if mode == "patches":
            patch_logits = model.apply(variables, images, train=False, method="patch_logits")
            return patch_scheme_sums(patch_logits, labels, valid, index, schemes)
        features = model.apply(variables, images, train=False, method="features")
        return channel_scheme_sums(features.astype(jnp.float32).mean(axis=(1, 2)), labels, valid,
                                   head_function(model, variables), schemes)

    return jax.jit(step)


def run_blackout(model: nn.Module, variables: Any, config: Any, schemes: Sequence[Scheme], *,
                 mode: str = "patches", max_examples: int | None = None,
                 split: str | None = None) -> list[dict[str, Any]]:
    """Evaluate every scheme over ``split`` (default: the config's eval split), or its first ``max_examples``.

    One row per scheme.
    """
    if mode not in MODES:
        raise UserError(f"unknown --mode {mode!r}: choose one of {', '.join(MODES)}")
    patches.receptive_field(model)  # raises for a model without a patch grid
    if mode == "channels":
        check_channel_mode(model)
    if max_examples is not None and max_examples < 1:
        raise UserError(f"--max-examples must be at least 1, got {max_examples}")
    size = int(config.image_size)
    shape = patches.grid_shape(model, size, size) if mode == "patches" else (model.num_features,)
    units = int(np.prod(shape))
    if split is not None:
        config = config.copy_and_resolve_references()
        config.data.eval_split = split
    total = data.dataset_info(config).num_eval
    total = total if max_examples is None else min(total, max_examples)
    step = blackout_step(model, schemes, mode)
    correct = np.zeros(len(schemes))
    loss = np.zeros(len(schemes))
    count, offset = 0, 0
    bar = tqdm.tqdm(total=total, desc=f"blackout ({mode})", unit="img", dynamic_ncols=True, mininterval=1.0)
    try:
        for batch in data.eval_batches(config, process_index=0, process_count=1):
            b = len(batch["label"])
            index = np.arange(offset, offset + b, dtype=np.int32)
            valid = np.asarray(batch["mask"], bool) & (index < total)
            offset += b
            if not valid.any():
                break
            c, l = jax.device_get(step(variables, batch["image"], batch["label"], valid, index))
            correct += c
            loss += l
            n = int(valid.sum())
            count += n
            bar.update(n)
    finally:
        bar.close()
    if count == 0:
        raise UserError(f"the split {config.data.eval_split!r} is empty: give another --split")
    return [{"mode": mode, "split": str(config.data.eval_split), "policy": s.policy, "keep_fraction": s.keep,
             "drop_fraction": round(s.drop, 6),
             "kept": scheme_kept(s, shape), "units": units, "seed": s.seed,
             "accuracy": correct[i] / count, "loss": loss[i] / count, "examples": count}
            for i, s in enumerate(schemes)]


# ----------------------------------------------------------------------------------------------- compute
def random_variables(model: nn.Module, seed: int = 0) -> dict[str, Any]:
    """Random weights with the model's shapes, without compiling its initialiser (costs depend on shapes only).

    Kernels are normal with fan-in scaling, BatchNorm statistics mean 0 / variance 1, so activations stay
    finite and ordinary (no denormals that would distort CPU timings).
    """
    rf = model.receptive_field
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, rf, rf, 3)), train=False), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("var", "scale"):
            return jnp.ones(s.shape, s.dtype)
        if name in ("mean", "bias"):
            return jnp.zeros(s.shape, s.dtype)
        fan_in = int(np.prod(s.shape[:-1])) or 1
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(fan_in), s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def _seconds(compiled: Callable, *args: Any, repeats: int) -> float:
    jax.block_until_ready(compiled(*args))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - start)
    return best


def compute_table(models: Sequence[str] = COMPUTE_MODELS, keeps: Sequence[float] = COMPUTE_KEEPS, *,
                  image_size: int = 224, batch: int = 1, num_classes: int = 1000, repeats: int = 2,
                  **model_kwargs: Any) -> list[dict[str, Any]]:
    """XLA FLOPs and best-of-``repeats`` wall time: dense ``patch_logits`` vs ``per_patch_logits`` of the kept patches.

    The dense pass shares every intermediate activation between overlapping patches; the sparse pass recomputes
    each rf x rf patch on its own, so it costs roughly ``kept x (cost of one patch)`` and beats the dense pass
    only below the break-even keep fraction ``dense / (all patches x one patch)``.
    """
    rows = []
    jobs = [(name, k) for name in models for k in keeps]
    bar = tqdm.tqdm(total=len(jobs), desc="compute table", unit="run", dynamic_ncols=True)
    try:
        for name in models:
            model = create_model(name, num_classes=num_classes, **model_kwargs)
            variables = random_variables(model)
            images = jnp.asarray(np.random.default_rng(1).standard_normal((batch, image_size, image_size, 3)),
                                 jnp.float32)
            dense = jax.jit(lambda v, x, m=model: jnp.mean(m.apply(v, x, train=False, method="patch_logits"),
                                                           axis=(1, 2))).lower(variables, images).compile()
            dense_flops, dense_s = _flops(dense), _seconds(dense, variables, images, repeats=repeats)
            grid = patches.all_locations(model, image_size, image_size)
            rng = np.random.default_rng(0)
            for keep in keeps:
                kept = num_kept(keep, len(grid))
                locations = np.sort(rng.choice(len(grid), size=kept, replace=False))
                sparse = jax.jit(lambda v, x, m=model, loc=grid[locations]: jnp.mean(
                    patches.per_patch_logits(m, v, x, loc), axis=1)).lower(variables, images).compile()
                sparse_flops = _flops(sparse)
                sparse_s = _seconds(sparse, variables, images, repeats=repeats)
                rows.append({"model": name, "image_size": image_size, "batch": batch, "patches": len(grid),
                             "keep_fraction": keep, "kept": kept, "dense_gflops": dense_flops / 1e9,
                             "sparse_gflops": sparse_flops / 1e9, "flops_ratio": sparse_flops / dense_flops,
                             "break_even_keep": dense_flops / (sparse_flops / kept * len(grid)),
                             "dense_ms": dense_s * 1e3, "sparse_ms": sparse_s * 1e3,
                             "time_ratio": sparse_s / dense_s})
                bar.update(1)
    finally:
        bar.close()
    return rows
