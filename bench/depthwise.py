"""AnchorNet training step: shifted multiply-add depthwise convs vs XLA's grouped convolution.

AnchorNet's bottlenecks (AnchorNet Tables 1 and 2, MobileNetV3 blocks) spend their k x k convolutions in
depthwise form. ``bagjax.models.layers.shifted_depthwise_conv`` writes each one as k*k shifted multiply-adds;
the baseline, ``grouped_depthwise_conv``, is ``lax.conv_general_dilated(..., feature_group_count=C)`` (what
``nn.Conv`` with ``feature_group_count`` lowers to). Both give the same outputs and gradients (checked here);
the timed work is one jitted forward + backward of the training loss (all six cross-entropies), best of 5.
``layers.depthwise_conv`` uses the shifted form on the CPU, where it wins, and in bfloat16 everywhere (on an H100
the grouped form's bf16 step did not finish compiling in 128 s, the shifted one took 72 s), and the grouped
one for float32 elsewhere, so the last line is 1.00x for float32 off the CPU; the line above it gives shifted over
grouped on any platform. The first call of each (trace, compile, run) is timed too.

    python bench/depthwise.py                 # 112 px, batch 32: the AnchorNet demo's input
    python bench/depthwise.py --image-size 224 --batch 128
    python bench/depthwise.py --image-size 224 --batch 256 --dtype bfloat16 --only shifted  # what bagjax runs
"""

from __future__ import annotations

import pathlib
import sys
import time
from unittest import mock

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bagjax import cli  # noqa: E402
from bagjax.models import anchornet, create_model, layers  # noqa: E402
from benchargs import at_least  # noqa: E402


IMPLEMENTATIONS = {"shifted": layers.shifted_depthwise_conv, "grouped": layers.grouped_depthwise_conv}


def loss_and_grad(model, variables, images, labels):
    def loss(params):
        (_, outputs), _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
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
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--only", choices=list(IMPLEMENTATIONS), default=None,
                        help="time one implementation, with no ratio (bf16 grouped convs compile for minutes on a GPU)")
    args = parser.parse_args()
    at_least(parser, args, image_size=anchornet.MIN_INPUT, batch=1, repeats=1)

    model = create_model("anchornet", num_classes=1000, dtype=jnp.dtype(args.dtype))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(args.batch, args.image_size, args.image_size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 1000, args.batch), jnp.int32)
    variables = jax.jit(lambda key: model.init(key, images[:1]))(jax.random.PRNGKey(0))

    steps, values, compile_seconds = [], [], []
    for impl in [IMPLEMENTATIONS[args.only]] if args.only else IMPLEMENTATIONS.values():
        with mock.patch.object(layers, "depthwise_conv", impl):  # traced (on the first call) with ``impl``
            start = time.perf_counter()
            steps.append(loss_and_grad(model, variables, images, labels))
            values.append(jax.block_until_ready(steps[-1](variables["params"])))
            compile_seconds.append(time.perf_counter() - start)
            print(f"  {impl.__name__}: first call (trace + compile + run) {compile_seconds[-1]:.1f} s", flush=True)
    if args.only:
        t = best_of(lambda: steps[0](variables["params"]), args.repeats)
        print(f"AnchorNet fwd+bwd, {args.image_size} px, batch {args.batch}, {args.dtype}, "
              f"{jax.devices()[0].device_kind}, {args.only} depthwise convs: {t * 1e3:.1f} ms "
              f"({args.batch / t:.1f} img/s)")
        return
    shifted_step, grouped_step = steps
    shifted_value, grouped_value = values
    # Relative L2 error of loss and gradients; on GPUs XLA's f32 convolutions run in TF32 (the baseline's
    # grouped conv included); on the CPU the two agree to ~1e-4 (rounding, amplified by batch-statistics BN).
    ours, theirs = jax.tree.leaves(shifted_value), jax.tree.leaves(grouped_value)
    error = float(jnp.sqrt(sum(jnp.sum((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2)
                               for a, b in zip(ours, theirs)) /
                           sum(jnp.sum(b.astype(jnp.float32) ** 2) for b in theirs)))
    if error > (5e-2 if args.dtype == "bfloat16" else 1e-2):
        raise SystemExit(f"depthwise implementations disagree: relative error {error:.3g}")

    params = variables["params"]
    t_shifted = best_of(lambda: shifted_step(params), args.repeats)
    t_grouped = best_of(lambda: grouped_step(params), args.repeats)
    # What layers.depthwise_conv runs here: shifted on the CPU and in half precision, else grouped.
    shifted_here = jax.default_backend() == "cpu" or jnp.dtype(args.dtype).itemsize < 4
    t_bagjax = t_shifted if shifted_here else t_grouped
    device = jax.devices()[0].device_kind
    print(f"AnchorNet fwd+bwd, {args.image_size} px, batch {args.batch}, {args.dtype}, {device}; "
          f"relative error {error:.2g}")
    print(f"  shifted multiply-adds: {t_shifted * 1e3:8.1f} ms  ({args.batch / t_shifted:8.1f} img/s), "
          f"compiled in {compile_seconds[0]:.1f} s")
    print(f"  grouped convolution:   {t_grouped * 1e3:8.1f} ms  ({args.batch / t_grouped:8.1f} img/s), "
          f"compiled in {compile_seconds[1]:.1f} s")
    print(f"  shifted over grouped: {t_grouped / t_shifted:.2f}x; bagjax uses the "
          f"{'shifted' if shifted_here else 'grouped'} form here")
    print(f"depthwise_train_step: {t_grouped / t_bagjax:.2f}x (bagjax over XLA grouped convolution)")


if __name__ == "__main__":
    main()
