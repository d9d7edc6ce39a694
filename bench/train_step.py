"""BagNet-33 training step: bagjax (jit, donated state) against the PyTorch reference under bf16 autocast.

One full training step (forward, BatchNorm in training mode, cross-entropy over 1,000 classes, backward, SGD with
momentum 0.9 and weight decay 1e-4) of BagNet-33 (Brendel & Bethge 2019) at 224 px on random device-resident
batches, so the input pipeline is out of the picture (``bench/input_pipeline.py`` measures it). bagjax runs
``bagjax.training.loop.train_step``, the step ``train.py`` jits; the baseline is tests/torch_reference.py (the
official architecture) with ``torch.autocast(bfloat16)`` and ``channels_last``, the usual fast PyTorch recipe.
Each is timed as the median of a few rounds after a warm-up round. PyTorch runs first, in a child process that
exits before JAX takes the GPU (both models' activations at batch 256 do not fit on an 80 GB card together).
Throughput is also given as model FLOP utilization (MFU): 3 x the forward FLOPs of XLA's cost analysis (a
multiply-add counts 2) over the card's dense bf16 peak.

    python bench/train_step.py [--batch 128 256] [--dtype bfloat16] [--pointwise conv dot] [--profile DIR]

``--pointwise dot`` runs every 1x1 conv as a matrix product over the channels instead of a convolution (the
same function, ``pointwise_as_matmul``; slower on an H100, where XLA already runs 1x1 convs as cuBLAS GEMMs).
``--profile DIR`` writes a ``jax.profiler`` trace of a few steps of the first variant and prints its top GPU
kernels by time, grouped into convolutions, matrix products, reductions (BatchNorm statistics), elementwise
fusions and copies.

    python bench/train_step.py --batch 256 --profile /tmp/trace   # the best setting on an H100 (16.6 % MFU)

The last line is ``bagnet33_train_step: R.RRx (bagjax over torch bf16 autocast + channels_last)``, the best
variant against torch at the same batch.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import pathlib
import subprocess
import sys
import time
from unittest import mock

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bagjax import cli  # noqa: E402
from bagjax.models import capabilities  # noqa: E402
from bagjax.training import optim  # noqa: E402
from bagjax.training.loop import train_step  # noqa: E402
from bagjax.training.state import TrainState  # noqa: E402
from bagjax.workdir import build_model  # noqa: E402
from benchargs import at_least, positive  # noqa: E402
from configs import default  # noqa: E402

MODEL = "bagnet33"
NUM_CLASSES = 1000
# Dense bf16 tensor-core peaks (datasheets, SXM parts) for MFU; other cards print no MFU unless --peak-tflops.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def forward_flops(model, variables, size: int) -> float:
    """FLOPs of one image's forward pass from XLA's cost analysis, lowered for the CPU (GPU convs are not counted)."""
    cpu = jax.devices("cpu")[0]
    on_cpu = jax.sharding.SingleDeviceSharding(cpu)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_cpu),
                            (variables, jnp.zeros((1, size, size, 3), jnp.float32)))
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)[0]).lower(*abstract)
    cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
    return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def make_config(batch: int, dtype: str, size: int):
    config = default.get_config()
    config.model, config.num_classes, config.image_size = MODEL, NUM_CLASSES, size
    config.batch_size, config.dtype = batch, dtype
    config.optimizer.name, config.optimizer.momentum, config.optimizer.weight_decay = "sgd", 0.9, 1e-4
    return config


def bagjax_step(config, pointwise: str, images: np.ndarray, labels: np.ndarray):
    """(run n steps and wait, compile seconds, forward FLOPs per image, jitted step, state) of bagjax's train step."""
    model = build_model(config, NUM_CLASSES)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images[:1])
    tx = optim.make_optimizer(config, variables["params"], 1000, 100_000)
    state = TrainState(jnp.zeros((), jnp.int32), variables["params"], variables["batch_stats"],
                       tx.init(variables["params"]))
    batch = {"image": jax.device_put(images), "label": jax.device_put(labels)}
    step = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config), donate_argnums=0)
    start = time.perf_counter()
    with pointwise_patch(pointwise):  # traced and compiled here, with the chosen 1x1 conv lowering
        compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run(n: int) -> None:
        metrics = None
        for _ in range(n):
            holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)
        if not bool(metrics["finite"]):
            raise SystemExit("bagjax train step produced a non-finite loss")

    flops = forward_flops(model, variables, config.image_size)
    return run, compile_s, flops, compiled, holder, batch


def pointwise_as_matmul(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
                        rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1, precision=None,
                        preferred_element_type=None, *, conv=jax.lax.conv_general_dilated, **kwargs) -> jax.Array:
    """``lax.conv_general_dilated`` (as ``nn.Conv`` calls it) with unpadded 1x1 NHWC convs as matrix products.

    A 1x1 conv with stride s is ``x[:, ::s, ::s] @ W[0, 0]``, the same function written as a dot, which XLA
    could fuse with the BatchNorm and ReLU before it. Measured on an H100 it is slower (XLA already runs 1x1
    convs as cuBLAS GEMMs); kept as the ``--pointwise dot`` variant. Anything else goes to ``conv``.
    """
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    plain = (tuple(rhs.shape[:2]) == (1, 1) and lhs.ndim == 4 and feature_group_count == 1 and not kwargs
             and (padding == "VALID" or all(tuple(p) == (0, 0) for p in padding))
             and all(tuple(d or (1, 1)) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc)
    if not plain:
        return conv(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
                    dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision,
                    preferred_element_type=preferred_element_type, **kwargs)
    sy, sx = window_strides
    x = lhs[:, ::sy, ::sx] if (sy, sx) != (1, 1) else lhs
    return jax.lax.dot_general(x, rhs[0, 0], (((3,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=preferred_element_type)


def pointwise_patch(pointwise: str):
    """A context in which flax's convs lower 1x1 kernels as matrix products (``dot``) or leave them (``conv``)."""
    if pointwise == "conv":
        return contextlib.nullcontext()
    return mock.patch.object(jax.lax, "conv_general_dilated",
                             pointwise_as_matmul)


def torch_step(images: np.ndarray, labels: np.ndarray, bf16: bool):
    """(run n steps and wait, device) of the PyTorch reference's train step, autocast bf16 + channels_last."""
    import torch
    import torch_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torch_reference.build_reference(MODEL, NUM_CLASSES).to(device).train()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    y = torch.from_numpy(labels).long().to(device)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4}, {"params": rest, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9)

    def run(n: int) -> None:
        for _ in range(n):
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return run, device


def torch_seconds(batch: int, args: argparse.Namespace) -> tuple[float, str]:
    """(median seconds per step, description) of the PyTorch reference, timed in a child process."""
    command = [sys.executable, __file__, "--torch-only", "--batch", str(batch), "--dtype", args.dtype,
               "--size", str(args.size), "--steps", str(args.steps), "--rounds", str(args.rounds)]
    child = subprocess.run(command, capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"the PyTorch baseline failed at batch {batch} (exit status {child.returncode}):\n"
                         f"{child.stderr[-2000:]}")
    seconds, device = child.stdout.strip().splitlines()[-1].split(" ", 1)
    return float(seconds), device


def run_torch_only(args: argparse.Namespace) -> None:
    """The child process of ``torch_seconds``: print 'SECONDS DESCRIPTION' on the last line."""
    batch = args.batch[0]
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, args.size, args.size, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
    run, device = torch_step(images, labels, args.dtype == "bfloat16")
    seconds = median_seconds({"torch": run}, args.rounds, args.steps)["torch"]
    print(f"{seconds} {device}, autocast {args.dtype}" + (" + channels_last" if args.dtype == "bfloat16" else ""))


def median_seconds(fns: dict, rounds: int, steps: int) -> dict:
    """Median seconds per step of each contender, in alternating rounds of ``steps`` steps after one warm-up round."""
    for fn in fns.values():
        fn(steps)
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(steps)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: float(np.median(t)) for name, t in times.items()}


KERNEL_KINDS = (  # (kind, substrings of a lower-cased kernel name), first match wins
    ("convolution", ("conv", "xmma", "implicit", "fprop", "dgrad", "wgrad", "cudnn", "winograd")),
    ("matrix product", ("gemm", "cublas", "cutlass", "sm90_", "triton_gemm", "dot")),
    ("reduction", ("reduce", "reduction")),
    ("copy / transpose", ("copy", "transpose", "memcpy", "memset", "pad", "slice", "concatenate")),
    ("elementwise fusion", ("fusion", "loop_", "convert", "add", "multiply", "select")),
)


def kernel_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in lower for k in keys)), "other")


def profile_table(trace_dir: pathlib.Path, steps: int, top: int = 25) -> None:
    """Print the GPU kernels of a jax.profiler trace by total time, and the time per kind of kernel."""
    from jax.profiler import ProfileData

    files = sorted(trace_dir.rglob("*.xplane.pb"))
    if not files:
        print(f"profile: no .xplane.pb under {trace_dir}")
        return
    data = ProfileData.from_file(str(files[-1]))
    totals: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for plane in data.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.lower().startswith("stream"):
                continue
            for event in line.events:
                totals[event.name] += event.duration_ns
                counts[event.name] += 1
    if not totals:
        print("profile: no GPU kernels in the trace (planes: " + ", ".join(p.name for p in data.planes) + ")")
        return
    whole = sum(totals.values())
    kinds: collections.Counter = collections.Counter()
    for name, ns in totals.items():
        kinds[kernel_kind(name)] += ns
    print(f"profile: {len(totals)} distinct GPU kernels, {whole / 1e6 / steps:.1f} ms of kernel time per step")
    for kind, ns in kinds.most_common():
        print(f"  {kind:20s} {ns / 1e6 / steps:8.2f} ms/step  {100 * ns / whole:5.1f} %")
    print(f"top {top} kernels (ms per step, launches per step, kind, name):")
    for name, ns in totals.most_common(top):
        print(f"  {ns / 1e6 / steps:7.3f}  {counts[name] / steps:5.1f}  {kernel_kind(name):18s} {name[:110]}")


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[128])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--pointwise", nargs="+", default=["conv"], choices=["conv", "dot"])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--profile", type=pathlib.Path, default=None, help="write a jax.profiler trace here")
    parser.add_argument("--no-torch", action="store_true", help="time bagjax only")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU")
    parser.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    at_least(parser, args, batch=1, size=capabilities(MODEL).receptive_field, steps=1, rounds=1)
    positive(parser, args, "peak_tflops")
    if args.profile is not None:
        try:
            cli.check_output_dir(args.profile, "--profile")
        except (ValueError, OSError) as e:
            parser.error(cli.error_line(e))
    if args.torch_only:
        return run_torch_only(args)

    # PyTorch first, each batch size in a child process that has exited before JAX takes the GPU.
    torch_results = {} if args.no_torch else {batch: torch_seconds(batch, args) for batch in args.batch}
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in kind), None)
    print(f"device: {kind}, jax {jax.__version__}, {args.dtype}, {args.size} px, XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    rng = np.random.default_rng(0)
    results, profile_run = [], None
    for batch in args.batch:
        images = rng.standard_normal((batch, args.size, args.size, 3)).astype(np.float32)
        labels = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
        contenders, notes, seconds = {}, {}, {}
        for pointwise in args.pointwise:
            config = make_config(batch, args.dtype, args.size)
            run, compile_s, flops, *_ = bagjax_step(config, pointwise, images, labels)
            contenders[f"bagjax pointwise={pointwise}"] = run
            profile_run = profile_run or run
            notes[f"bagjax pointwise={pointwise}"] = f"compile {compile_s:5.1f} s"
        seconds.update(median_seconds(contenders, args.rounds, args.steps))
        if batch in torch_results:
            seconds["torch"], notes["torch"] = torch_results[batch]
        print(f"batch {batch} ({3 * flops / 1e9:.1f} GFLOP per image per step):")
        for name, s in seconds.items():
            tflops = 3 * flops * batch / s / 1e12
            mfu = f", MFU {100 * tflops / peak:4.1f} %" if peak else ""
            print(f"  {name:24s} {batch / s:8.1f} img/s  {s * 1e3:7.1f} ms/step  {tflops:6.1f} TFLOP/s{mfu}"
                  f"  ({notes[name]})", flush=True)
            results.append((batch, name, batch / s))
    if args.profile is not None:
        with jax.profiler.trace(str(args.profile)):
            profile_run(3)
        print(f"profile of bagjax pointwise={args.pointwise[0]}, batch {args.batch[0]} (trace in {args.profile}):")
        profile_table(args.profile, 3)
    if not args.no_torch:
        best = max((r for r in results if r[1] != "torch"), key=lambda r: r[2])
        baseline = next(r for r in results if r[1] == "torch" and r[0] == best[0])
        print(f"best: {best[1]}, batch {best[0]}")
        print(f"bagnet33_train_step: {best[2] / baseline[2]:.2f}x (bagjax over torch bf16 autocast + channels_last)")


if __name__ == "__main__":
    main()
