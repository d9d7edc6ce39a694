"""Is the input pipeline the bottleneck? Its images/s for 224 px JPEGs against BagNet-33's train step.

Writes a small ImageFolder of JPEGs (ImageNet-like sizes, 500x375) in a temp dir, times
``bagjax.data.train_batches`` at 224 px (decode, random resized crop, flip, normalize), then times the jitted
train step of a full BagNet-33 on random batches of the same size, on this machine. A ratio above 1 means the
pipeline outruns the model.

    python bench/input_pipeline.py [--batch-size 32] [--images 256] [--steps 5] [--dtype bfloat16]

Last line: ``input_pipeline: R.RRx (bagjax input pipeline over BagNet-33 train step)``.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from bagjax import data  # noqa: E402
from bagjax.training import optim, sharding  # noqa: E402
from bagjax.training.loop import train_step  # noqa: E402
from bagjax.training.state import TrainState  # noqa: E402
from bagjax.models import build_model  # noqa: E402
from configs import default  # noqa: E402


def write_jpegs(root: pathlib.Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("validation", 8)):
        for i in range(count):
            folder = root / split / f"class{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            # smooth random images compress like photos (pure noise would be unrealistically large)
            small = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(folder / f"{i}.jpg", quality=90)


def pipeline_rate(config, batches: int) -> float:
    it = data.train_batches(config, start_step=0, process_index=0, process_count=1)
    next(it)  # warm up the thread pool
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * config.batch_size / (time.perf_counter() - start)


def train_step_rate(config, steps: int) -> float:
    model = build_model(config, 4)
    mesh = sharding.make_mesh()
    x = jnp.zeros((config.batch_size, config.image_size, config.image_size, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    tx = optim.make_optimizer(config, variables["params"], 100, 1000)
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"], variables["batch_stats"],
                       tx.init(variables["params"]))
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config), donate_argnums=0)
    rng = np.random.default_rng(0)
    batch = sharding.global_batch({"image": rng.normal(size=x.shape).astype(np.float32),
                                   "label": rng.integers(0, 4, config.batch_size).astype(np.int32)}, mesh)
    for _ in range(2):  # compile; the second call sees the step's own output shardings
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return steps * config.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    config = default.get_config()
    config.model, config.image_size, config.batch_size, config.dtype = "bagnet33", 224, args.batch_size, args.dtype
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(pathlib.Path(tmp), args.images)
        config.dataset = f"imagefolder:{tmp}"
        pipe = pipeline_rate(config, max(args.images // args.batch_size - 1, 2))
    model_rate = train_step_rate(config, args.steps)
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, batch {args.batch_size}, 224 px, {args.dtype}")
    print(f"input pipeline (JPEG decode + random resized crop + flip): {pipe:9.1f} images/s")
    print(f"BagNet-33 train step:                                   {model_rate:9.1f} images/s")
    print(f"input_pipeline: {pipe / model_rate:.2f}x (bagjax input pipeline over BagNet-33 train step)")


if __name__ == "__main__":
    main()
