"""The device mesh and the shardings of state and batches (``jax.jit`` with ``NamedSharding``).

One mesh axis, ``data``, over every device of every process. Batches are split along it; parameters are
replicated, or with ``fsdp`` their largest divisible axis is split along it too (ZeRO-3 style). BatchNorm
statistics inside a jitted step on a sharded global batch are global-batch statistics.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
# Parameters smaller than this many elements stay replicated under FSDP: splitting them costs more than it saves.
FSDP_MIN_SIZE = 2**14


def make_mesh() -> Mesh:
    """A 1-D mesh over all devices of all processes, in Auto mode (newer JAX defaults to Explicit sharding types)."""
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape: tuple[int, ...], num_devices: int) -> P:
    """Split the largest axis divisible by the device count; small or indivisible arrays stay replicated."""
    if int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE or num_devices == 1:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % num_devices == 0:
            return P(*([None] * axis + [DATA_AXIS]))
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, fsdp: bool = False) -> Any:
    """A sharding for every leaf of ``abstract_state`` (a tree of ShapeDtypeStructs)."""
    if not fsdp:
        return jax.tree.map(lambda _: replicated(mesh), abstract_state)
    n = mesh.devices.size
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n)), abstract_state)


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each process's share of the batch into global arrays split along ``data``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
