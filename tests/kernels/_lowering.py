"""Lowering Pallas kernels for an accelerator from a CPU-only host (shared by the kernel tests)."""
import contextlib

import jax


def lowering_target(platform):
    """Context that names the device a lowering for `platform` is meant for, where jax asks.

    From jax 0.11 the Triton lowering reads the target GPU's compute capability from the
    abstract mesh's device when no GPU is attached (an H200 here, the machine the kernels
    are measured on); jax 0.10 lowers without one, and other platforms need none.
    """
    if platform not in ("cuda", "gpu") or not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132,
                                         platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (),
                                                                    abstract_device=device))


def lowered_text(fn, *args, platform):
    """StableHLO text of jax.jit(fn) traced at args and lowered for `platform`."""
    with lowering_target(platform):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
