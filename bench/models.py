"""Eval-mode BagNet-33 throughput: bagjax (jit) against the PyTorch reference with the same weights.

BagNet-33 (Brendel & Bethge 2019, Sec. 3) at 224 px, batch 8, inference only. The PyTorch side is
tests/torch_reference.py (the official architecture) under `torch.no_grad()` in eval mode with its
default thread count; its weights are converted with bagjax.convert so both compute the same function.
`--dtype bfloat16` compares bagjax bf16 compute with torch autocast bf16 in channels_last (on CUDA
when torch sees a GPU, else on the CPU). FLOPs per image come from XLA's cost analysis (on the CPU backend).

    python bench/models.py [--dtype bfloat16] [--batch 8] [--size 224] [--iters 5]

The last line is `bagnet33_eval: R.RRx (bagjax over PyTorch reference)`.
"""
from __future__ import annotations

import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_reference  # noqa: E402
from bagjax import cli, convert  # noqa: E402
from bagjax.models import capabilities, create_model  # noqa: E402
from benchargs import at_least  # noqa: E402

MODEL = "bagnet33"
NUM_CLASSES = 1000


def _flops(fn, *args) -> float:
    """FLOPs of one call of `fn(*args)` (a multiply-add counts 2), from XLA's cost analysis on the CPU.

    The module is lowered for the CPU backend whatever the accelerator: on GPU the convolutions
    become cuDNN custom calls that XLA's cost analysis does not count. The analysis is a dict, or a
    list of one in older jax; the lowered module is compiled only if it offers no analysis.
    """
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), args)
    lowered = jax.jit(fn).lower(*abstract)
    cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def _median_seconds(fns: dict, rounds: int) -> dict:
    """Median seconds per call of each function (each waits for its result), timed in alternating rounds after two warm-ups.

    Alternating the contenders makes a slow spell on a shared machine hit both alike.
    """
    for fn in fns.values():
        fn()
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def bagjax_step(variables, images: np.ndarray, dtype: jnp.dtype):
    """(eval step returning logits as numpy, FLOPs per image) of the jitted Flax model."""
    model = create_model(MODEL, num_classes=NUM_CLASSES, dtype=dtype)
    variables = jax.device_put(variables)
    x = jax.device_put(images)
    apply = lambda v, x: model.apply(v, x, train=False)[0]  # noqa: E731
    compiled = jax.jit(apply).lower(variables, x).compile()
    return (lambda: np.asarray(compiled(variables, x))), _flops(apply, variables, x) / images.shape[0]


def torch_step(reference: torch.nn.Module, images: np.ndarray, bf16: bool):
    """(eval step returning logits as numpy, device) of the PyTorch reference under no_grad in eval mode."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = reference.to(device).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    if bf16:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> np.ndarray:
        with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            return model(x).float().cpu().numpy()  # the copy to the host waits for the GPU

    return step, device


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=5, help="timed rounds (median)")
    args = parser.parse_args()
    at_least(parser, args, batch=1, size=capabilities(MODEL).receptive_field, iters=1)

    reference = torch_reference.build_reference(MODEL, NUM_CLASSES)
    variables = convert.from_torch_state_dict(MODEL, reference.state_dict())
    images = np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3)).astype(np.float32)
    bf16 = args.dtype == "bfloat16"

    jax_fn, flops = bagjax_step(variables, images, jnp.dtype(args.dtype))
    torch_fn, torch_device = torch_step(reference, images, bf16)
    max_diff = float(np.max(np.abs(jax_fn() - torch_fn())))
    seconds = _median_seconds({"bagjax": jax_fn, "torch": torch_fn}, args.iters)
    jax_ips, torch_ips = args.batch / seconds["bagjax"], args.batch / seconds["torch"]
    print(f"{MODEL} eval, batch {args.batch}, {args.size} px, {args.dtype}")
    print(f"bagjax ({jax.devices()[0].platform}): {jax_ips:.2f} images/s, "
          f"{flops / 1e9:.2f} GFLOPs/image (XLA cost analysis)")
    print(f"PyTorch reference ({torch_device}, {torch.get_num_threads()} threads): {torch_ips:.2f} images/s")
    print(f"max |logit difference| bagjax vs PyTorch: {max_diff:.2e}")
    print(f"bagnet33_eval: {jax_ips / torch_ips:.2f}x (bagjax over PyTorch reference)")


if __name__ == "__main__":
    main()
