"""What every stage needs before it starts: its error type, processes, and the mesh."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax
from jax.sharding import Mesh

from instructjax.parallel import mesh as mesh_lib


class StageError(ValueError):
    """A user-facing problem with a stage's config or inputs (printed as one line)."""


def is_main_process() -> bool:
    """True on the process that writes logs, summaries and run records."""
    return jax.process_index() == 0


def initialize_distributed(dist: Any) -> bool:
    """Starts multi-process JAX from `dist` (settings.DistributedSettings); returns whether
    it did.

    With `dist.enabled` and a `coordinator_address` ("host:port"), every process passes the
    same address and `num_processes` and its own `process_id`. With an empty address JAX
    finds them itself: the JAX_COORDINATOR_ADDRESS environment variable or a supported
    cluster (SLURM, Open MPI, Cloud TPU, GKE). Call once, before anything touches a device.
    """
    if not dist.enabled:
        return False
    if dist.coordinator_address:
        if not 0 <= dist.process_id < dist.num_processes:
            raise StageError(f"distributed.process_id={dist.process_id} must be in "
                             f"[0, distributed.num_processes={dist.num_processes})")
        jax.distributed.initialize(dist.coordinator_address, dist.num_processes,
                                   dist.process_id)
    else:
        jax.distributed.initialize()
    return True


T = TypeVar("T")


def main_process_first(fn: Callable[[], T], name: str) -> T:
    """Runs `fn` on process 0, then on the others, then lets everyone go on.

    For preparing files in a shared workdir (demo data, TFDS builds): process 0 writes them
    alone, the others find them there (or write their own copy on a host-local disk), and no
    process reads a file another one is still writing. `name` labels the barriers.
    """
    if jax.process_count() == 1:
        return fn()
    from jax.experimental import multihost_utils
    result = fn() if is_main_process() else None
    multihost_utils.sync_global_devices(f"{name}:main-done")
    if not is_main_process():
        result = fn()
    multihost_utils.sync_global_devices(f"{name}:all-done")
    return result


def build_mesh(mesh_shape: dict, model: dict, *, global_batch: int | None,
               micro_batches: int = 1) -> Mesh:
    """The device mesh of `config.mesh` (`mesh_shape`), checked against the global batch
    (rows per step; None: not checked here, PPO checks its own sizes) and the head counts of
    `model` (`config.model`)."""
    mesh = mesh_lib.make_mesh(dict(mesh_shape))
    mesh_lib.check_fits(mesh, global_batch=global_batch, num_heads=int(model["num_heads"]),
                        num_kv_heads=int(model["num_kv_heads"]), micro_batches=micro_batches)
    return mesh
