"""Per-process host batches -> one global jax.Array per key, sharded over the batch axes.

Every process loads its own shard of the data (`data.loaders`, shard = process index);
`make_global_batch` stitches the processes' [B_local, ...] numpy arrays into global
[B_local * process_count, ...] arrays before any jitted call sees them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


# The default batch axes are `mesh.BATCH_AXES`, spelled out so that this module (imported by
# the training loop's data path) does not pull in flax through `parallel.mesh`.
def make_global_batch(host_batch: Mapping[str, np.ndarray], mesh: Mesh,
                      batch_axes: Sequence[str] = ("data", "fsdp")) -> dict[str, jax.Array]:
    """Assembles every process's batch into global arrays sharded over the batch dim.

    Args:
        host_batch: this process's batch, arrays [B_local, ...] with the same B_local.
        mesh: the device mesh.
        batch_axes: mesh axes the batch dim is split over.

    Returns:
        Same keys, jax.Arrays of shape [B_local * process_count, ...] and the host arrays'
        dtypes, with sharding `NamedSharding(mesh, P(batch_axes))` (other dims replicated).

    Raises:
        ValueError: an unknown mesh axis, ragged batch sizes, or a global batch that does
            not divide evenly over the devices along `batch_axes`.
    """
    batch_axes = tuple(batch_axes)
    unknown = [a for a in batch_axes if a not in mesh.shape]
    if unknown:
        raise ValueError(f"batch axes {unknown} are not mesh axes {tuple(mesh.shape)}")
    sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in host_batch.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ValueError(f"host batch arrays need one common leading batch dim, got {sizes}")
    local_batch = next(iter(sizes.values()))
    global_batch = local_batch * jax.process_count()
    num_shards = math.prod(mesh.shape[a] for a in batch_axes)
    if global_batch % num_shards:
        raise ValueError(
            f"global batch {global_batch} ({local_batch} per process x "
            f"{jax.process_count()} processes) is not divisible by {num_shards}, the number "
            f"of devices along mesh axes {batch_axes} "
            f"({ {a: mesh.shape[a] for a in batch_axes} }); change the batch size or mesh")
    sharding = NamedSharding(mesh, P(batch_axes))
    return {k: jax.make_array_from_process_local_data(
                sharding, np.asarray(v), (global_batch,) + np.shape(v)[1:])
            for k, v in host_batch.items()}
