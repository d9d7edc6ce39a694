"""Input pipeline throughput: Grain worker processes against in-process decoding, on the same JPEGs, in one run.

Writes an ImageFolder of 500x375 JPEGs (ImageNet-like) in a temp dir and times ``bagjax.data.train_batches`` at the
224 px train transform (decode, random resized crop, flip; uint8 out) twice: with ``data.workers=0`` (decoding in
this process, the baseline) and with ``--workers`` Grain worker processes. Worker start-up (time to the first batch)
is reported apart from the steady rate. Then JPEG draft mode: 4000x3000 photos through the same transform, decoded
in DCT-reduced draft mode (what the pipeline does) against full decoding. Optionally (``--train-step``) the jitted
BagNet-33 train step on batches of the same size, to tell whether the input keeps up with the model, and
(``--end-to-end STEPS``) ``train.py``'s own img/s on the JPEG folder.

    python bench/input_pipeline.py                        # this 2-core machine: 2 workers over in-process
    python bench/input_pipeline.py --workers 16 --images 2048 --train-step --end-to-end 60 --dtype bfloat16  # GPU host

Last line: ``input_pipeline: R.RRx (bagjax W workers over in-process)``.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bagjax import cli, data  # noqa: E402
from bagjax.data import preprocess  # noqa: E402
from benchargs import at_least  # noqa: E402
from configs import default  # noqa: E402


CLASSES = 4  # label folders of the ImageFolder (every one gets train images)


def write_jpegs(root: pathlib.Path, n: int, size: tuple[int, int] = (500, 375), classes: int = CLASSES) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("validation", classes * 2)):
        for i in range(count):
            folder = root / split / f"class{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            # smooth random images compress like photos (pure noise would be unrealistically large)
            small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(small).resize(size, Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)


def pipeline_rate(config, batches: int) -> tuple[float, float]:
    """(seconds to the first batch, i.e. start-up; images/s over `batches` batches after every worker's first)."""
    start = time.perf_counter()
    it = data.train_batches(config, start_step=0, process_index=0, process_count=1)
    next(it)
    first = time.perf_counter() - start
    for _ in range(2 * max(config.data.workers, 1) - 1):  # every worker running, its buffer filled once
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * config.batch_size / (time.perf_counter() - start)
    it.close()
    return first, rate


def draft_speedup(root: pathlib.Path, n: int, size: int) -> tuple[float, float]:
    """Images/s of the 224 px train transform on 4000x3000 JPEGs: (draft mode, full decoding)."""
    write_jpegs(root, n, size=(4000, 3000), classes=1)
    paths = sorted(str(p) for p in (root / "train").rglob("*.jpg"))
    rates = []
    for lazy in (True, False):
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for path in paths:
            image = preprocess.open_image(path) if lazy else preprocess.load_image_file(path)
            preprocess.preprocess_for_train(image, rng, size, scale=(0.08, 1.0))
        rates.append(len(paths) / (time.perf_counter() - start))
    return rates[0], rates[1]


def train_step_rate(config, steps: int) -> float:
    import jax
    import jax.numpy as jnp

    from bagjax.training import optim, sharding
    from bagjax.training.loop import train_step
    from bagjax.training.state import TrainState
    from bagjax.models import build_model

    model = build_model(config, 4)
    mesh = sharding.make_mesh()
    x = jnp.zeros((config.batch_size, config.image_size, config.image_size, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    tx = optim.make_optimizer(config, variables["params"], 100, 1000)
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"], variables["batch_stats"],
                       tx.init(variables["params"]))
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config), donate_argnums=0)
    rng = np.random.default_rng(0)
    batch = sharding.global_batch({"image": rng.integers(0, 256, x.shape, dtype=np.uint8),
                                   "label": rng.integers(0, 4, config.batch_size).astype(np.int32)}, mesh)
    for _ in range(2):  # compile; the second call sees the step's own output shardings
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return steps * config.batch_size / (time.perf_counter() - start)


def end_to_end_rate(config, steps: int, workdir: str) -> float:
    """train.py's own images/s (metrics.jsonl), on the JPEG folder, after its first logged window."""
    from bagjax.training.loop import train_and_evaluate

    config.total_steps, config.log_every_steps = steps, max(steps // 3, 1)
    config.eval_every_steps, config.checkpoint_every_steps, config.heatmap_images = steps, steps, 0
    train_and_evaluate(config, workdir)
    rates = [r["images_per_sec"] for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
             if "images_per_sec" in r]
    return float(np.mean(rates[1:] or rates))


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="Grain worker processes (the baseline is 0)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=384,
                        help=f"500x375 JPEGs in the train split ({CLASSES} classes)")
    parser.add_argument("--batches", type=int, default=120, help="batches timed after the warm-up (each side a few seconds)")
    parser.add_argument("--photos", type=int, default=8, help="4000x3000 JPEGs for the draft-mode figure")
    parser.add_argument("--train-step", action="store_true", help="also time the BagNet-33 train step")
    parser.add_argument("--end-to-end", type=int, default=0, metavar="STEPS", help="also run train.py for STEPS")
    parser.add_argument("--steps", type=int, default=3, help="train steps timed with --train-step")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    at_least(parser, args, workers=1, batch_size=1, images=CLASSES, batches=1, photos=1, end_to_end=0, steps=1)

    config = default.get_config()
    config.model, config.image_size, config.batch_size, config.dtype = "bagnet33", 224, args.batch_size, args.dtype
    config.eval_batch_size = args.batch_size
    print(f"host: {os.cpu_count()} cores; batch {args.batch_size}, 224 px train transform, 500x375 JPEGs")
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(pathlib.Path(tmp) / "jpegs", args.images)
        config.dataset = f"imagefolder:{pathlib.Path(tmp) / 'jpegs'}"
        data.dataset_info(config)  # the readability scan, once, outside the timings
        config.data.workers = 0
        start0, base = pipeline_rate(config, args.batches)
        config.data.workers = args.workers
        start_w, rate = pipeline_rate(config, args.batches)
        e2e = end_to_end_rate(config, args.end_to_end, os.path.join(tmp, "run")) if args.end_to_end else None
        drafted, full = draft_speedup(pathlib.Path(tmp) / "photos", args.photos, 224)
    print(f"in-process (workers=0):   {base:8.1f} img/s   first batch after {start0:5.1f} s")
    print(f"{args.workers} worker processes:     {rate:8.1f} img/s   first batch after {start_w:5.1f} s "
          "(worker start-up)")
    print(f"per worker:               {rate / max(args.workers, 1):8.1f} img/s")
    print(f"4000x3000 JPEGs, 224 px: draft mode {drafted:.1f} img/s, full decoding {full:.1f} img/s: "
          f"{drafted / full:.2f}x")
    if args.train_step:
        import jax

        model_rate = train_step_rate(config, args.steps)
        print(f"BagNet-33 train step ({jax.devices()[0].device_kind} x{jax.device_count()}, {args.dtype}): "
              f"{model_rate:8.1f} img/s; input over train step: {rate / model_rate:.2f}x")
    if e2e is not None:
        print(f"train.py end to end on the JPEG folder ({args.workers} workers): {e2e:8.1f} img/s")
    print(f"input_pipeline: {rate / base:.2f}x (bagjax {args.workers} workers over in-process)")


if __name__ == "__main__":
    main()
