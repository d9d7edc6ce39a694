"""Robustness of a trained BagNet to one adversarial patch: certified (PatchGuard, Clipped BagNet) and attacked.

    python -m bagjax.experiments.patch_robustness --workdir W --patch-size 4%,8% [--defense mask,clip,none]
        [--max-examples N] [--attack-examples 64] [--steps 40] [--starts 2] [--locations danger|grid]
        [--num-locations 8] [--clip cbn] [--clip-max inf] [--threshold 0] [--out DIR]

For each defense (``bagjax.robust``: ``none`` = the plain mean, ``mask`` = PatchGuard's robust masking (Xiang et
al. 2021, Mask-BN), ``clip`` = Clipped BagNet (Zhang et al. 2020)) and patch size (``4%`` of the image area,
rounded up to a square side as PatchGuard does, or ``12px``):

- clean accuracy of the defended prediction and certified accuracy (no patch of that size anywhere can change
  it) over the eval split, from one dense ``patch_logits`` pass per batch;
- empirical robust accuracy on the first ``--attack-examples`` images: an untargeted PGD patch attack
  (``bagjax.attack``) at the ``--num-locations`` windows the certificate finds most dangerous (or an even grid),
  ``--starts`` random starts each. Every image the attack breaks must be uncertified; the table counts violations.

Writes ``robustness.md``, ``robustness.csv``, ``robustness.png`` (accuracies) and ``robustness_attack.png``
(attacked image, patch and the window robust masking removes, on the evidence map) to ``WORKDIR/robustness``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the eval pipeline uses tf.data; keep its logs quiet

from bagjax import atomic, cli  # noqa: E402

if __name__ == "__main__":
    cli.exit_on_signals()  # first: a Ctrl-C while jax loads ends in one line too

import argparse  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402

from bagjax import attack, data, interpret, patches, robust  # noqa: E402
from bagjax.experiments import report  # noqa: E402
from bagjax.errors import UserError  # noqa: E402

def parse_patch_sizes(text: str, image_size: int) -> list[tuple[str, int]]:
    """``"4%,8%,12px"`` -> ``[(label, side px)]``: a percentage of the image area rounds the side up (PatchGuard)."""
    sizes = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        unit = "%" if item.endswith("%") else "px" if item.endswith("px") else ""
        number = item[:len(item) - len(unit)]
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise UserError(f"bad patch size {item!r}: use a percentage of the image area (4%) or pixels (12px)")
        if not unit:
            raise UserError(f"patch size {item!r} has no unit: write {item}% (of the image area) or {item}px")
        if value <= 0:
            raise UserError(f"bad patch size {item!r}: a patch size is positive, e.g. 4% or 12px")
        if unit == "px" and not value.is_integer():
            raise UserError(f"bad patch size {item!r}: pixels are whole numbers, e.g. 12px")
        side = math.ceil(math.sqrt(value / 100.0 * image_size * image_size) - 1e-9) if unit == "%" else int(value)
        if item in (label for label, _ in sizes):
            raise UserError(f"--patch-size lists {item} twice: give each size once")
        if side < 1 or side > image_size:
            raise UserError(f"patch size {item} is {side} px, which does not fit the {image_size} px images: "
                            f"use a patch of 1 to {image_size} px")
        sizes.append((item, side))
    if not sizes:
        raise UserError("give at least one --patch-size, e.g. 4%,8%")
    return sizes


def defense_kwargs(defense: str, clip: robust.Clip, clip_max: float, threshold: float) -> tuple:
    """The static keyword arguments of ``robust.defended_logits`` for one defense, as a hashable tuple."""
    if defense == "mask":
        return (("clip_max", clip_max), ("threshold", threshold))
    if defense == "clip":
        return (("clip", clip),)
    if defense == "none":
        return ()
    raise UserError(f"unknown --defense {defense!r}: choose from {', '.join(robust.DEFENSES)}")


def check_settings(defenses: Sequence[str], *, clip_max: float = math.inf, threshold: float = 0.0,
                   max_examples: int | None = None, attack_examples: int = 64, steps: int = 40, starts: int = 2,
                   step_size: float = 0.05, locations: str = "danger", num_locations: int = 8) -> None:
    """The settings of ``run_robustness``, checked before anything is loaded or computed: a one-line ValueError
    that names the valid range for each bad one."""
    if not defenses:
        raise UserError(f"give at least one --defense, from {', '.join(robust.DEFENSES)}")
    for d in defenses:
        if d not in robust.DEFENSES:
            raise UserError(f"unknown --defense {d!r}: choose from {', '.join(robust.DEFENSES)}")
    twice = sorted({d for d in defenses if defenses.count(d) > 1})
    if twice:
        raise UserError(f"--defense lists {', '.join(twice)} twice: give each defense once")
    if locations not in ("danger", "grid"):
        raise UserError(f"unknown --locations {locations!r}: use danger or grid")
    if max_examples is not None and max_examples < 1:
        raise UserError(f"--max-examples must be at least 1, got {max_examples}")
    if attack_examples < 0:
        raise UserError(f"--attack-examples must be 0 (no attack) or more, got {attack_examples}")
    for name, value in (("--steps", steps), ("--starts", starts), ("--num-locations", num_locations)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if not 0.0 < step_size <= 1.0:
        raise UserError(f"--step-size is a fraction of the pixel range in (0, 1], got {step_size:g}")
    if not clip_max > 0.0:
        raise UserError(f"--clip-max (PatchGuard's c_h) must be positive (inf: no clipping), got {clip_max:g}")
    if not 0.0 <= threshold < 1.0:
        raise UserError(f"--threshold must lie in [0, 1), got {threshold:g}")


@functools.partial(jax.jit, static_argnums=(0,))
def _patch_logits(model, variables, images):
    return model.apply(variables, images, train=False, method="patch_logits").astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("defense", "window", "kwargs"))
def _certify(patch_logits, labels, *, defense, window, kwargs):
    return robust.certify(patch_logits, labels, defense, window, **dict(kwargs))


def _timed(fn, *args, **kwargs) -> tuple[Any, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - start


def run_robustness(model, variables, config, sizes: Sequence[tuple[str, int]], defenses: Sequence[str], *,
                   clip: robust.Clip, clip_max: float = math.inf, threshold: float = 0.0,
                   max_examples: int | None = None, attack_examples: int = 64, steps: int = 40, starts: int = 2,
                   step_size: float = 0.05, locations: str = "danger", num_locations: int = 8, seed: int = 0,
                   attack_batch: int = 512) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Certify every eval image and attack the first ``attack_examples``: one row per (defense, patch size).

    Also returns one attacked example per row for the figure (the first broken one, else the strongest attack).
    """
    check_settings(defenses, clip_max=clip_max, threshold=threshold, max_examples=max_examples,
                   attack_examples=attack_examples, steps=steps, starts=starts, step_size=step_size,
                   locations=locations, num_locations=num_locations)
    rf, stride = patches.receptive_field(model)
    size = int(config.image_size)
    total = data.dataset_info(config).num_eval
    total = total if max_examples is None else min(total, max_examples)
    if total == 0:
        raise UserError("the eval split is empty: check config.data.eval_split")
    jobs = [(d, label, px, robust.window_shape(model, px, size, size)) for d in defenses for label, px in sizes]
    stats = {j[:3]: dict(correct=0, certified=0, count=0, a_correct=0, a_certified=0, a_robust=0, a_count=0,
                         violations=0, cert_s=0.0, attack_s=0.0, attack_images=0) for j in jobs}
    examples: dict[tuple, dict[str, Any]] = {}
    key = jax.random.key(seed)
    offset = 0
    bar = tqdm.tqdm(total=total, desc="patch robustness", unit="img", dynamic_ncols=True, mininterval=1.0)
    try:
        for batch in data.eval_batches(config, process_index=0, process_count=1):
            b = len(batch["label"])
            index = np.arange(offset, offset + b)
            valid = np.asarray(batch["mask"], bool) & (index < total)
            offset += b
            if not valid.any():
                break
            images = jax.jit(data.normalize)(batch["image"])  # uint8 to the device, normalized there
            labels = jnp.asarray(batch["label"], jnp.int32)
            patch_logits = _patch_logits(model, variables, images)
            attack_rows = np.flatnonzero(valid & (index < attack_examples))
            for d, label, px, window in jobs:
                s = stats[(d, label, px)]
                kwargs = defense_kwargs(d, clip, clip_max, threshold)
                cert = jax.device_get(_certify(patch_logits, labels, defense=d, window=window, kwargs=kwargs))
                if s["count"] == 0:  # time a compiled call
                    _, seconds = _timed(_certify, patch_logits, labels, defense=d, window=window, kwargs=kwargs)
                    s["cert_s"] = seconds / b
                correct = (cert["prediction"] == np.asarray(labels)) & valid
                s["correct"] += int(correct.sum())
                s["certified"] += int((cert["certified"] & valid).sum())
                s["count"] += int(valid.sum())
                if len(attack_rows) == 0:
                    continue
                if locations == "danger" and d != "none":
                    origins = attack.danger_origins(jnp.asarray(cert["margin"][attack_rows]), num_locations,
                                                    patch_px=px, rf=rf, stride=stride, image_size=size)
                else:
                    grid = jnp.asarray(attack.grid_origins(size, px, num_locations))
                    origins = jnp.broadcast_to(grid, (len(attack_rows), *grid.shape))
                k = origins.shape[1]
                entries = np.repeat(attack_rows, k * starts)  # (image, location, start) flattened
                flat_origins = jnp.tile(origins[:, None], (1, starts, 1, 1)).reshape(-1, 2)
                chunk = min(attack_batch, len(entries))
                padded = np.concatenate([np.arange(len(entries)), np.full(-len(entries) % chunk, len(entries) - 1)])
                first = entries[:chunk]  # compiled ahead, so that the time below is the attack's alone
                run = attack.pgd_patch.lower(
                    model, variables, images[first], labels[first], flat_origins[:chunk], key, defense=d,
                    window=window, patch_px=px, steps=steps, step_size=step_size, defense_kwargs=kwargs).compile()
                broken = np.zeros(len(entries), bool)
                margins = np.zeros(len(entries), np.float32)
                best_patches = []
                start = time.perf_counter()
                for lo in range(0, len(padded), chunk):
                    key, sub = jax.random.split(key)
                    sl, rows = slice(lo, min(lo + chunk, len(entries))), padded[lo:lo + chunk]
                    out = jax.device_get(run(variables, images[entries[rows]], labels[entries[rows]],
                                             flat_origins[rows], sub, step_size=step_size))
                    n = sl.stop - sl.start
                    broken[sl], margins[sl] = out["broken"][:n], out["margin"][:n]
                    best_patches.append(out["patch"][:n])
                s["attack_s"] += time.perf_counter() - start
                s["attack_images"] += len(attack_rows)
                image_broken = broken.reshape(len(attack_rows), -1).any(axis=1)
                a_correct, a_cert = correct[attack_rows], cert["certified"][attack_rows]
                s["a_count"] += len(attack_rows)
                s["a_correct"] += int(a_correct.sum())
                s["a_certified"] += int(a_cert.sum())
                s["a_robust"] += int((a_correct & ~image_broken).sum())
                s["violations"] += int((a_cert & image_broken).sum())
                if (d, label, px) not in examples or (image_broken.any() and not examples[(d, label, px)]["broken"]):
                    pick = int(np.argmax(broken)) if broken.any() else int(np.argmax(margins))
                    row = int(entries[pick])
                    examples[(d, label, px)] = {
                        "defense": d, "patch_size": label, "patch_px": px, "window": window,
                        "image": np.asarray(images[row]), "label": int(labels[row]),
                        "origin": np.asarray(flat_origins[pick]), "patch": np.concatenate(best_patches)[pick],
                        "broken": bool(broken[pick]), "certified": bool(cert["certified"][row]),
                        "kwargs": kwargs}
            bar.update(int(valid.sum()))
    finally:
        bar.close()
    rows = []
    for d, label, px, window in jobs:
        s = stats[(d, label, px)]
        a = max(s["a_count"], 1)
        rows.append({"defense": d, "patch_size": label, "patch_px": px, "area_fraction": px * px / size ** 2,
                     "window": f"{window[0]}x{window[1]}", "grid": "x".join(map(str, patches.grid_shape(
                         model, size, size))), "examples": s["count"], "clean_accuracy": s["correct"] / s["count"],
                     "certified_accuracy": s["certified"] / s["count"], "attack_examples": s["a_count"],
                     "attack_clean_accuracy": s["a_correct"] / a, "attack_certified_accuracy": s["a_certified"] / a,
                     "empirical_accuracy": s["a_robust"] / a, "certified_but_broken": s["violations"],
                     "certify_ms_per_image": s["cert_s"] * 1e3,
                     "attack_s_per_image": s["attack_s"] / max(s["attack_images"], 1),
                     "steps": steps, "starts": starts, "locations": f"{locations}:{num_locations}"})
    return rows, [examples[j[:3]] for j in jobs if j[:3] in examples]


# ----------------------------------------------------------------------------------------------- report
def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def robustness_markdown(rows: Sequence[dict[str, Any]], title: str) -> str:
    """The table: clean, certified and empirical robust accuracy per defense and patch size, and their costs."""
    r0 = rows[0]
    table = report.markdown_table(
        ["defense", "patch", "px", "area", "window", "clean acc.", "certified acc.", "attacked images",
         "clean / certified on them", "empirical robust acc.", "certified but broken", "certify ms/img",
         "attack s/img"],
        [[r["defense"], r["patch_size"], f"{r['patch_px']}x{r['patch_px']}", _pct(r["area_fraction"]), r["window"],
          _pct(r["clean_accuracy"]), _pct(r["certified_accuracy"]), r["attack_examples"],
          f"{_pct(r['attack_clean_accuracy'])} / {_pct(r['attack_certified_accuracy'])}",
          _pct(r["empirical_accuracy"]), r["certified_but_broken"], f"{r['certify_ms_per_image']:.3f}",
          f"{r['attack_s_per_image']:.2f}"] for r in rows])
    device = jax.devices()[0]
    return (f"## Patch robustness: {title}\n\n"
            f"{r0['examples']} eval images on a {r0['grid']} logit grid; certified = no patch of that size anywhere "
            "changes the (correct) prediction (PatchGuard's provable analysis for `mask`, Clipped BagNet's bound "
            "for `clip`; the plain mean `none` certifies nothing). Empirical: untargeted PGD patch attack, "
            f"{r0['steps']} steps x {r0['starts']} random starts at {r0['locations']} locations per image, on the "
            f"first {r0['attack_examples']} images. Times on {device.platform} ({device.device_kind}).\n\n" + table)


def plot_accuracies(rows: Sequence[dict[str, Any]], path: str | pathlib.Path, title: str) -> None:
    """Grouped bars: clean, certified and empirical robust accuracy for every (defense, patch size)."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(rows) + 2), 4))
    x = np.arange(len(rows))
    for k, (key, name) in enumerate((("clean_accuracy", "clean"), ("certified_accuracy", "certified"),
                                     ("empirical_accuracy", "empirical (attacked)"))):
        ax.bar(x + (k - 1) * 0.27, [r[key] for r in rows], 0.27, label=name)
    ax.set_xticks(x, [f"{r['defense']}\n{r['patch_size']} ({r['patch_px']} px)" for r in rows])
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    report.save_figure(fig, path, dpi=120)


def plot_attacks(model, variables, examples: Sequence[dict[str, Any]], class_names: Sequence[str],
                 path: str | pathlib.Path, *, clip_max: float = math.inf) -> None:
    """One row per (defense, patch size): clean image, attacked image, the patch, evidence map of the attacked image.

    The evidence map is the (clipped, for ``mask``) patch logit of the defended prediction; the red box is the
    window robust masking removes for that class, the yellow box the patch's window on the grid.
    """
    from matplotlib.patches import Rectangle

    plt = report.pyplot()
    fig, axes = plt.subplots(len(examples), 4, figsize=(12, 3.1 * len(examples)), squeeze=False)
    rf, stride = patches.receptive_field(model)
    for row, ex in zip(axes, examples):
        image, origin, px = ex["image"], ex["origin"], ex["patch_px"]
        attacked = np.asarray(attack.paste(jnp.asarray(image), jnp.asarray(ex["patch"]), jnp.asarray(origin)))
        logits = np.asarray(_patch_logits(model, variables, jnp.asarray(attacked)[None]))[0]
        kwargs = dict(ex["kwargs"])
        defended = robust.defended_logits(jnp.asarray(logits), ex["defense"], ex["window"], **kwargs)
        predicted = int(robust.predicted_class(defended, ex["defense"]))
        evidence = np.asarray(robust.clip_evidence(logits, clip_max) if ex["defense"] == "mask" else logits)
        gh, gw = evidence.shape[:2]
        height, width = image.shape[:2]
        cell_h, cell_w = height / gh, width / gw
        box = Rectangle((origin[1] - 0.5, origin[0] - 0.5), px, px, fill=False, ec="yellow", lw=2)
        row[0].imshow(interpret.denormalize(image))
        row[0].add_patch(Rectangle((origin[1] - 0.5, origin[0] - 0.5), px, px, fill=False, ec="yellow", lw=1,
                                   ls="--"))
        row[0].set_title(f"clean, label {class_names[ex['label']]}", fontsize=9)
        row[1].imshow(interpret.denormalize(attacked))
        row[1].add_patch(box)
        state = "broken" if ex["broken"] else "not broken"
        row[1].set_title(f"{ex['defense']}, {ex['patch_size']}: {state}\npredicted {class_names[predicted]}"
                         f"{' (certified)' if ex['certified'] else ''}", fontsize=9)
        row[2].imshow(interpret.denormalize(ex["patch"]), interpolation="nearest")
        row[2].set_title(f"patch {px}x{px} px at {tuple(int(o) for o in origin)}", fontsize=9)
        interpret.plot_heatmap(evidence[..., predicted], attacked, row[3])
        y0, y1 = robust.touched_range(int(origin[0]), px, rf, stride, gh)
        x0, x1 = robust.touched_range(int(origin[1]), px, rf, stride, gw)
        row[3].add_patch(Rectangle((int(x0) * cell_w, int(y0) * cell_h), (int(x1) - int(x0)) * cell_w,
                                   (int(y1) - int(y0)) * cell_h, fill=False, ec="yellow", lw=2))
        title = f"evidence of {class_names[predicted]}"
        if ex["defense"] == "mask":
            a, b = np.asarray(robust.masked_window(jnp.asarray(logits), ex["window"], predicted, clip_max=clip_max))
            wy, wx = ex["window"]
            row[3].add_patch(Rectangle((b * cell_w, a * cell_h), wx * cell_w, wy * cell_h, fill=False, ec="red",
                                       lw=2, ls="--"))
            title += "\nred: masked window, yellow: patch's window"
        row[3].set_title(title, fontsize=9)
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    report.save_figure(fig, path, dpi=100)


# ----------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m bagjax.experiments.patch_robustness",
                           description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a BagNet training workdir (python train.py ... --workdir DIR)")
    p.add_argument("--patch-size", default="4%,8%",
                   help="comma-separated square patch sizes, each with its unit: a percentage of the image area "
                        "(4%%) or pixels (12px)")
    p.add_argument("--defense", default="mask,clip,none", help=f"comma-separated, from {', '.join(robust.DEFENSES)}")
    p.add_argument("--out", help="output directory (default: WORKDIR/robustness)")
    p.add_argument("--max-examples", type=int, help="certify only the first N eval images")
    p.add_argument("--attack-examples", type=int, default=64, help="attack the first N eval images (0: no attack)")
    p.add_argument("--steps", type=int, default=40, help="PGD steps per start")
    p.add_argument("--starts", type=int, default=2, help="random starts per location")
    p.add_argument("--step-size", type=float, default=0.05,
                   help="PGD step as a fraction of the pixel range, in (0, 1]")
    p.add_argument("--locations", choices=("danger", "grid"), default="danger",
                   help="danger: the windows with the lowest certificate margin; grid: an even grid of positions")
    p.add_argument("--num-locations", type=int, default=8, help="patch locations attacked per image")
    p.add_argument("--clip", help="clip function of the clip defense (default: the workdir's config.robust.clip, "
                                  "else cbn = tanh(0.05 x - 1))")
    p.add_argument("--clip-max", type=float, default=math.inf,
                   help="PatchGuard's c_h > 0: clip local logits to [0, c_h]")
    p.add_argument("--threshold", type=float, default=0.0, help="PatchGuard's detection threshold T in [0, 1)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    from bagjax.workdir import load_trained

    defenses = [d.strip() for d in args.defense.split(",") if d.strip()]
    settings = dict(clip_max=args.clip_max, threshold=args.threshold, max_examples=args.max_examples,
                    attack_examples=args.attack_examples, steps=args.steps, starts=args.starts,
                    step_size=args.step_size, locations=args.locations, num_locations=args.num_locations)
    check_settings(defenses, **settings)
    out = cli.check_output_dir(args.out or pathlib.Path(args.workdir) / "robustness")
    trained = load_trained(args.workdir)
    patches.receptive_field(trained.model)  # one-line error for a model that is not a BagNet
    sizes = parse_patch_sizes(args.patch_size, int(trained.config.image_size))
    clip = robust.parse_clip(args.clip or robust.config_clip(trained.config) or "cbn")
    cli.check_workdir_dataset(trained.config, args.workdir)
    start = time.perf_counter()
    rows, examples = run_robustness(
        trained.model, trained.variables, trained.config, sizes, defenses, clip=clip, seed=args.seed, **settings)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{trained.config.model}, {trained.config.image_size} px, {args.workdir}"
    markdown = robustness_markdown(rows, title)
    atomic.write_text(out / "robustness.md", markdown)
    report.write_csv(out / "robustness.csv", rows)
    plot_accuracies(rows, out / "robustness.png", f"Patch robustness: {trained.config.model}")
    written = ["robustness.md", "robustness.csv", "robustness.png"]
    if examples:
        plot_attacks(trained.model, trained.variables, examples, trained.class_names, out / "robustness_attack.png",
                     clip_max=args.clip_max)
        written.append("robustness_attack.png")
    print(markdown)
    violations = sum(r["certified_but_broken"] for r in rows)
    if violations:
        print(f"WARNING: the attack broke {violations} certified image(s): the certificate is unsound here, "
              "please report it", flush=True)
    print(f"patch robustness in {time.perf_counter() - start:.1f} s; wrote {', '.join(written)} to {out}", flush=True)


if __name__ == "__main__":
    cli.run_main(main)
