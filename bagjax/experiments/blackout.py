"""Patch "blackout": how much of a BagNet's bag of local evidence does a prediction need?

Zou, Yan & Liu, "CNN Image Recognition Architecture Simplification using Patch-Based Data Reduction
Techniques" (sections 5-6, Table 1): evaluate a trained BagNet while ignoring part of its evidence, either
every other patch ("alternating") or a random 25%, 50% or 75% of patches.

    python -m bagjax.experiments.blackout --workdir DIR [--out DIR] [--seeds 5] [--mode patches|channels]
                                          [--max-examples N] [--compute-table]

Two modes, because the paper's text and its public code disagree:

- ``--mode patches`` (default, the paper's text, section 5): a BagNet's image logits are the mean of its patch
  logits (Brendel & Bethge 2019, section 2), so blacking out patches means the image logits become the mean over
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

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the eval pipeline uses tf.data; keep its logs quiet

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402

from bagjax import data, patches  # noqa: E402
from bagjax.experiments import report  # noqa: E402
from bagjax.models import create_model  # noqa: E402
from bagjax.models.heads import Head  # noqa: E402
from bagjax.training.loop import cross_entropy  # noqa: E402

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
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    bad = [k for k in sweep_keeps if not 0.0 <= k < 1.0]
    if bad:
        raise ValueError(f"keep fractions must lie in [0, 1) (1 is the no-blackout scheme), got {bad}")
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
    raise ValueError(f"unknown blackout policy {scheme.policy!r}: choose one of {', '.join(POLICIES)}")


def kept_patch_logits(patch_logits: jax.Array, mask: jax.Array) -> jax.Array:
    """Image logits as the mean over the kept patches only: ``(B, H', W', C), (B, H', W') -> (B, C)``."""
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
    raise ValueError(f"unknown blackout policy {scheme.policy!r}: choose one of {', '.join(POLICIES)}")


# ----------------------------------------------------------------------------------------------- heads
def head_function(model: nn.Module, variables: Any) -> Callable[[jax.Array], jax.Array]:
    """The model's classifier head alone, ``(..., n_c) -> (..., C)``, for channel blackout."""
    head = Head(model.head, model.num_classes, model.dtype)
    head_vars = {"params": variables["params"].get("head", {})}
    return lambda x: head.apply(head_vars, x)


def check_channel_mode(model: nn.Module) -> None:
    if getattr(model, "head", None) not in LINEAR_HEADS:
        raise ValueError(f"--mode channels zeroes fc weight columns and needs a linear head ({', '.join(LINEAR_HEADS)}), "
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
                 mode: str = "patches", max_examples: int | None = None) -> list[dict[str, Any]]:
    """Evaluate every scheme over the eval split (or its first ``max_examples``); one row per scheme."""
    if mode not in MODES:
        raise ValueError(f"unknown --mode {mode!r}: choose one of {', '.join(MODES)}")
    patches.receptive_field(model)  # raises for a model without a patch grid
    if mode == "channels":
        check_channel_mode(model)
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"--max-examples must be at least 1, got {max_examples}")
    size = int(config.image_size)
    shape = patches.grid_shape(model, size, size) if mode == "patches" else (model.num_features,)
    units = int(np.prod(shape))
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
        raise ValueError("the eval split is empty: check config.data.eval_split")
    return [{"mode": mode, "policy": s.policy, "keep_fraction": s.keep, "drop_fraction": round(s.drop, 6),
             "kept": scheme_kept(s, shape), "units": units, "seed": s.seed,
             "accuracy": correct[i] / count, "loss": loss[i] / count, "examples": count}
            for i, s in enumerate(schemes)]


# ----------------------------------------------------------------------------------------------- report
def _grouped(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, float], list[dict[str, Any]]]:
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["policy"], r["keep_fraction"]), []).append(r)
    return groups


def _cell(group: list[dict[str, Any]], key: str) -> str:
    return report.format_mean_std([r[key] for r in group])


def blackout_markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
    """Table 1 of the blackout paper (schemes as columns) and the keep-fraction sweep (random vs top-evidence)."""
    groups = _grouped(rows)
    mode, units = rows[0]["mode"], rows[0]["units"]
    unit = "patches" if mode == "patches" else "channels"
    seeds = len(groups.get(("random", round(1 - PAPER_DROPS[0], 6)), []))
    columns = [("No blackout", groups[("none", 1.0)]), ('Alternating "blackout"', groups[("alternating", 0.5)])]
    columns += [(f'Random {round(d * 100)}% "blackout"', groups[("random", round(1 - d, 6))]) for d in PAPER_DROPS]
    table1 = report.markdown_table(
        ["", *[name for name, _ in columns]],
        [[f"Kept {unit}", *[f"{g[0]['kept']} / {units}" for _, g in columns]],
         ["Eval accuracy", *[_cell(g, "accuracy") for _, g in columns]],
         ["Eval cross-entropy", *[_cell(g, "loss") for _, g in columns]]])
    keeps = sorted({k for p, k in groups if p == "random"})
    sweep = report.markdown_table(
        ["kept fraction", f"kept {unit}", "random accuracy", "random cross-entropy", "top-evidence accuracy",
         "top-evidence cross-entropy"],
        [[f"{k:.2f}", groups[("random", k)][0]["kept"], _cell(groups[("random", k)], "accuracy"),
          _cell(groups[("random", k)], "loss"), _cell(groups[("top", k)], "accuracy"),
          _cell(groups[("top", k)], "loss")] for k in keeps])
    return (f"## Blackout, mode `{mode}`: {title}\n\n"
            f"{rows[0]['examples']} eval examples, {units} {unit} per image; random schemes: mean ± std over "
            f"{seeds} seed(s); random p% = p% of the {unit} dropped. Shaped like Table 1 of Zou, Yan & Liu:\n\n"
            f"{table1}\n"
            f"### Keep-fraction sweep (at least one of the {units} {unit} kept)\n\n"
            "Top-evidence keeps the units with the largest contribution to the unmasked model's predicted "
            "class; it peeks at the model's own evidence.\n\n" + sweep)


def plot_blackout(rows: Sequence[dict[str, Any]], path: str | pathlib.Path, title: str) -> None:
    """Accuracy and cross-entropy against the dropped fraction: random (± std), top-evidence, alternating."""
    plt = report.pyplot()
    groups = _grouped(rows)
    none = groups[("none", 1.0)][0]
    keeps = sorted({k for p, k in groups if p == "random"}, reverse=True)  # ascending dropped fraction
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    units = none["units"]
    drops = [0.0] + [1.0 - groups[("random", k)][0]["kept"] / units for k in keeps]  # as actually dropped
    alternating = groups[("alternating", 0.5)][0]
    for ax, key, label in zip(axes, ("accuracy", "loss"), ("accuracy", "cross-entropy")):
        stats = [(none[key], 0.0)] + [report.mean_std([r[key] for r in groups[("random", k)]]) for k in keeps]
        mean, std = np.array([m for m, _ in stats]), np.array([s for _, s in stats])
        ax.plot(drops, mean, "o-", ms=3, label="random")
        ax.fill_between(drops, mean - std, mean + std, alpha=0.25)
        ax.plot(drops, [none[key]] + [groups[("top", k)][0][key] for k in keeps], "s-", ms=3,
                label="top-evidence (peeks)")
        ax.plot([1.0 - alternating["kept"] / units], [alternating[key]], "D", ms=8, label="alternating")
        ax.set_xlabel(f"dropped fraction of {'patches' if none['mode'] == 'patches' else 'channels'}")
        ax.set_ylabel(f"eval {label}")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def compute_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The compute table: where evaluating only the kept patches saves FLOPs and time, and where it cannot."""
    device = jax.devices()[0]
    table = report.markdown_table(
        ["model", "kept fraction", "kept patches", "dense GFLOPs", "sparse GFLOPs", "sparse / dense FLOPs",
         "break-even kept fraction", "dense ms", "sparse ms", "sparse / dense time"],
        [[r["model"], f"{r['keep_fraction']:.2f}", f"{r['kept']} / {r['patches']}", f"{r['dense_gflops']:.2f}",
          f"{r['sparse_gflops']:.2f}", f"{r['flops_ratio']:.3f}x", f"{r['break_even_keep']:.3f}",
          f"{r['dense_ms']:.1f}", f"{r['sparse_ms']:.1f}", f"{r['time_ratio']:.3f}x"] for r in rows])
    r0 = rows[0]
    return (f"## Sparse (kept patches only) vs dense evaluation\n\n"
            f"Random weights, {r0['batch']} image(s) of {r0['image_size']} px, {device.platform} "
            f"({device.device_kind}); FLOPs from XLA's cost analysis, time the best of repeated jitted calls. "
            "Sparse evaluation runs `bagjax.patches.per_patch_logits` on the kept patches only; it saves compute "
            "only below the break-even kept fraction, because overlapping patches share no work.\n\n" + table)


# ----------------------------------------------------------------------------------------------- CLI
def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bagjax.experiments.blackout",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", help="a BagNet training workdir (python train.py ... --workdir DIR)")
    p.add_argument("--out", help="output directory (default: WORKDIR/blackout)")
    p.add_argument("--seeds", type=int, default=5, help="seeds of every random scheme (mean ± std)")
    p.add_argument("--mode", choices=MODES, default="patches",
                   help="patches: mean over kept patches (paper text); channels: zeroed fc columns (paper code)")
    p.add_argument("--max-examples", type=int, help="evaluate only the first N eval examples")
    p.add_argument("--keeps", type=_floats, default=list(SWEEP_KEEPS),
                   help="kept fractions of the sweep, comma-separated, in [0, 1) (0 keeps one unit)")
    p.add_argument("--compute-table", action="store_true",
                   help="also measure sparse vs dense FLOPs and time of BagNet-9/17/33 (random weights)")
    p.add_argument("--compute-keeps", type=_floats, default=list(COMPUTE_KEEPS),
                   help="kept fractions of the compute table, comma-separated, in [0, 1]")
    p.add_argument("--compute-image-size", type=int, default=224)
    p.add_argument("--compute-batch", type=int, default=1)
    args = p.parse_args(argv)
    if not args.workdir and not args.compute_table:
        p.error("give --workdir DIR (blackout of a trained BagNet) and/or --compute-table")
    if not args.workdir and not args.out:
        p.error("--compute-table without --workdir needs --out DIR")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = pathlib.Path(args.out or pathlib.Path(args.workdir) / "blackout")
    out.mkdir(parents=True, exist_ok=True)
    if args.workdir:
        from bagjax.workdir import load_trained

        trained = load_trained(args.workdir)
        schemes = make_schemes(args.seeds, args.keeps)
        start = time.perf_counter()
        rows = run_blackout(trained.model, trained.variables, trained.config, schemes, mode=args.mode,
                            max_examples=args.max_examples)
        title = f"{trained.config.model}, head `{trained.config.head}`, {args.workdir}"
        markdown = blackout_markdown(rows, title)
        (out / "blackout.md").write_text(markdown)
        report.write_csv(out / "blackout.csv", rows)
        plot_blackout(rows, out / "blackout.png", f"Blackout ({args.mode}): {trained.config.model}")
        print(markdown)
        print(f"blackout: {len(schemes)} schemes in {time.perf_counter() - start:.1f} s; wrote "
              f"{out / 'blackout.md'}, blackout.csv, blackout.png", flush=True)
    if args.compute_table:
        bad = [k for k in args.compute_keeps if not 0.0 <= k <= 1.0]
        if bad:
            raise SystemExit(f"error: --compute-keeps must lie in [0, 1], got {bad}")
        rows = compute_table(keeps=args.compute_keeps, image_size=args.compute_image_size,
                             batch=args.compute_batch)
        markdown = compute_markdown(rows)
        (out / "compute.md").write_text(markdown)
        report.write_csv(out / "compute.csv", rows)
        print(markdown)
        print(f"wrote {out / 'compute.md'} and compute.csv", flush=True)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, TypeError) as e:
        sys.exit(f"error: {e}")
