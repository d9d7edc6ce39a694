"""AnchorNet training step: bagjax's shifted multiply-add depthwise conv vs XLA's grouped convolution.

AnchorNet's bottlenecks (AnchorNet Tables 1 and 2, MobileNetV3 blocks) spend their k x k convolutions in
depthwise form. ``bagjax.models.layers.depthwise_conv`` writes each one as k*k shifted multiply-adds; the
baseline is the same model with ``lax.conv_general_dilated(..., feature_group_count=C)`` (what ``nn.Conv``
with ``feature_group_count`` lowers to). Both give the same outputs and gradients (checked here); the timed
work is one jitted forward + backward of the training loss (all six cross-entropies) at batch 32, best of 5.

    python bench/depthwise.py                 # 112 px, the AnchorNet demo's input
    python bench/depthwise.py --image-size 224 --batch 256 --dtype bfloat16   # ImageNet training, on a GPU
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from bagjax.models import anchornet, create_model, layers


def grouped_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """The baseline: XLA's grouped convolution, one group per channel."""
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=x.shape[-1])


def loss_and_grad(model, variables, images, labels):
    def loss(params):
        outputs, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
                                 mutable=["batch_stats"])
        return anchornet.training_loss(outputs, labels)

    return jax.jit(jax.value_and_grad(loss))


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    model = create_model("anchornet", num_classes=1000, dtype=jnp.dtype(args.dtype))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(args.batch, args.image_size, args.image_size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 1000, args.batch), jnp.int32)
    variables = jax.jit(lambda key: model.init(key, images[:1]))(jax.random.PRNGKey(0))

    bagjax_step = loss_and_grad(model, variables, images, labels)
    with mock.patch.object(layers, "depthwise_conv", grouped_conv):
        baseline_step = loss_and_grad(model, variables, images, labels)
        baseline_value = jax.block_until_ready(baseline_step(variables["params"]))  # traced with the baseline
    bagjax_value = jax.block_until_ready(bagjax_step(variables["params"]))
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(bagjax_value[1]))
    worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(bagjax_value),
                                                                 jax.tree.leaves(baseline_value)))
    if worst > (3e-2 if args.dtype == "bfloat16" else 1e-3) * max(scale, 1.0):
        raise SystemExit(f"depthwise implementations disagree: max |difference| {worst:.3g}")

    params = variables["params"]
    t_bagjax = best_of(lambda: bagjax_step(params), args.repeats)
    t_baseline = best_of(lambda: baseline_step(params), args.repeats)
    device = jax.devices()[0].device_kind
    print(f"AnchorNet fwd+bwd, {args.image_size} px, batch {args.batch}, {args.dtype}, {device}; "
          f"max |difference| {worst:.2g}")
    print(f"  shifted multiply-adds: {t_bagjax * 1e3:8.1f} ms  ({args.batch / t_bagjax:8.1f} img/s)")
    print(f"  grouped convolution:   {t_baseline * 1e3:8.1f} ms  ({args.batch / t_baseline:8.1f} img/s)")
    print(f"depthwise_train_step: {t_baseline / t_bagjax:.2f}x (bagjax over XLA grouped convolution)")


if __name__ == "__main__":
    main()
