"""What ``config.fsdp`` costs and saves for BagNet-33: per-device state and collectives of the sharded train step.

Compiles ``bagjax.training.loop.train_step`` for BagNet-33 (1,000 classes, SGD with momentum) on a mesh of
``--devices`` devices, as ``train.py`` does (``sharding.state_shardings``, donated state), once with replicated
state and once with ``fsdp=True``, and reads from the compiled step: the bytes of train state each device holds,
XLA's memory analysis (arguments, outputs, temporaries per device) and the collectives in the optimized HLO with
the bytes they move. Without accelerators it runs on ``--devices`` simulated CPU devices
(``--xla_force_host_platform_device_count``; ``--real-devices`` takes the machine's), the multi-GPU dry run;
memory and collectives are properties of the sharded program, so they carry over to GPUs (temporaries differ by
backend). Activations scale with the
batch and image size, which default small here to keep the CPU compile short.

    python bench/fsdp.py [--devices 2] [--batch 4] [--size 64]

The last line is ``fsdp_state_per_device: R.RRx (bagjax fsdp over replicated state)``.
"""
from __future__ import annotations

import argparse
import collections
import functools
import math
import os
import pathlib
import re
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bagjax import cli  # noqa: E402  (imports no jax: the device count is set before jax starts)
from benchargs import at_least  # noqa: E402

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="global batch")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--real-devices", action="store_true", help="use the machine's devices, not simulated CPUs")
    args = parser.parse_args()
    at_least(parser, args, devices=1, batch=1)
    return parser, args


def collective_bytes(hlo: str) -> dict[str, tuple[int, int]]:
    """{collective: (count, bytes of its results)} in an optimized HLO module's text."""
    sizes = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
    found: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for line in hlo.splitlines():
        match = re.search(r" (" + "|".join(COLLECTIVES) + r")(-start)?\(", line)
        if not match or "= " not in line[:match.start()]:
            continue
        shapes = line[line.index("= ") + 2:match.start()]  # a shape or a tuple of them (with /*index=N*/ notes)
        nbytes = sum(sizes.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
                     for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shapes))
        found[match.group(1)][0] += 1
        found[match.group(1)][1] += nbytes
    return {k: (v[0], v[1]) for k, v in found.items()}


def main() -> None:
    parser, args = parse_args()
    if not args.real_devices:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bagjax.models import capabilities
    from bagjax.training import optim, sharding
    from bagjax.training.loop import train_step
    from bagjax.training.state import TrainState
    from bagjax.workdir import build_model
    from configs import default

    devices = jax.device_count()
    if args.batch % devices:
        parser.error(f"--batch {args.batch} is not divisible by the {devices} devices: use a multiple of {devices}")
    at_least(parser, args, size=capabilities("bagnet33").receptive_field)
    config = default.get_config()
    config.model, config.num_classes, config.image_size, config.batch_size = "bagnet33", 1000, args.size, args.batch
    model = build_model(config, 1000)
    mesh = sharding.make_mesh()
    dummy = jnp.zeros((1, args.size, args.size, 3), jnp.float32)
    abstract_vars = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), dummy)
    tx = optim.make_optimizer(config, abstract_vars["params"], 1000, 100_000)
    abstract_state = jax.eval_shape(lambda v: TrainState(jnp.zeros((), jnp.int32), v["params"], v["batch_stats"],
                                                         tx.init(v["params"])), abstract_vars)
    batch = {"image": jax.ShapeDtypeStruct((args.batch, args.size, args.size, 3), jnp.float32,
                                           sharding=sharding.batch_sharding(mesh)),
             "label": jax.ShapeDtypeStruct((args.batch,), jnp.int32, sharding=sharding.batch_sharding(mesh))}
    print(f"BagNet-33 train step, {jax.device_count()} x {jax.devices()[0].device_kind}, global batch {args.batch}, "
          f"{args.size} px; state {sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_state)) / 2**20:.1f}"
          " MiB (params + momentum + BatchNorm statistics)")
    per_device = {}
    for fsdp in (False, True):
        shardings = sharding.state_shardings(abstract_state, mesh, fsdp)
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
        step = jax.jit(functools.partial(train_step, model=model, tx=tx, config=config),
                       in_shardings=(shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
        compiled = step.lower(state, batch).compile()
        held = sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                   for a, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)))
        per_device[fsdp] = held
        memory = compiled.memory_analysis()
        collectives = collective_bytes(compiled.as_text())
        print(f"fsdp={fsdp!s:5}: state per device {held / 2**20:7.1f} MiB; compiled per device: arguments "
              f"{memory.argument_size_in_bytes / 2**20:.1f} MiB, "
              f"temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB")
        for name, (count, nbytes) in sorted(collectives.items()):
            print(f"    {name:18s} x{count:3d}  {nbytes / 2**20:8.1f} MiB per step")
    print(f"fsdp_state_per_device: {per_device[True] / per_device[False]:.2f}x (bagjax fsdp over replicated state)")


if __name__ == "__main__":
    main()
