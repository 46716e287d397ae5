"""Ahead-of-time compilation helpers: virtual devices, sharded abstract values, per-device bytes
and what XLA reports about a compiled program.

Nothing here allocates model-sized arrays: values are `jax.ShapeDtypeStruct`s carrying a
NamedSharding, programs are lowered from them and compiled, never run.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
from jax.sharding import NamedSharding


class VirtualDevicesError(RuntimeError):
    """The backends started before enough (virtual) devices could be requested."""


def request_cpu_devices(count: int) -> None:
    """Asks for `count` CPU devices; must run before anything initialises jax's backends.

    On a machine with `count` real accelerators this is harmless: the CPU client simply has
    `count` devices that nobody uses. Raises VirtualDevicesError when the backends already
    started with fewer devices than needed (then set XLA_FLAGS before starting Python).
    """
    try:
        jax.config.update("jax_num_cpu_devices", int(count))
    except RuntimeError as err:
        if len(jax.devices("cpu")) < count and len(jax.devices()) < count:
            raise VirtualDevicesError(
                f"jax started before {count} virtual devices could be requested; run with "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={count}") from err


def target_devices(count: int) -> list[jax.Device]:
    """`count` devices of the default backend if it has them, else `count` CPU devices.

    count 0 means all devices of the default backend.
    """
    if count <= 0:
        return list(jax.devices())
    if len(jax.devices()) >= count:
        return list(jax.devices())[:count]
    cpus = jax.devices("cpu")
    if len(cpus) < count:
        raise VirtualDevicesError(
            f"need {count} devices, have {len(jax.devices())} {jax.default_backend()} and "
            f"{len(cpus)} cpu; call request_cpu_devices({count}) before jax starts")
    return list(cpus)[:count]


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `abstract` carrying the matching leaf of `shardings`."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def cast_abstract(abstract: Any, dtype: Any) -> Any:
    """The same ShapeDtypeStructs (shardings kept) with floating leaves in `dtype`."""
    def cast(a):
        if not jax.numpy.issubdtype(a.dtype, jax.numpy.floating):
            return a
        return jax.ShapeDtypeStruct(a.shape, jax.numpy.dtype(dtype), sharding=a.sharding)
    return jax.tree.map(cast, abstract)


def count_leaves(abstract: Any) -> int:
    """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(abstract))


def bytes_per_device(abstract: Any) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (largest shard).

    Every leaf needs a NamedSharding; shards of unevenly split dims count at their largest.
    """
    total = 0
    for leaf in jax.tree.leaves(abstract):
        sharding = leaf.sharding
        if not isinstance(sharding, NamedSharding):
            raise TypeError(f"leaf {leaf} has no NamedSharding")
        total += math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    return total


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """What XLA says about one compiled program, per device.

    Bytes from `memory_analysis()`: arguments, outputs, aliased (donated inputs reused as
    outputs), temporaries, generated code; `peak` = arguments + outputs - aliased + temp +
    code, the program's own footprint. `flops` and `bytes_accessed` from `cost_analysis()`,
    which counts a loop body once (see extrapolate_layers).
    compile_seconds includes lowering.
    """
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        """The program's own per-device footprint while it runs."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returned one dict per module
        cost = cost[0] if cost else {}
    return cost or {}


def fast_compile_options(platform: str) -> dict | None:
    """XLA options that skip LLVM's expensive passes on CPU (about 2x faster compiles).

    They change generated code only, not buffer assignment: memory_analysis() and
    cost_analysis() were seen identical with and without them. None off CPU.
    """
    if platform != "cpu":
        return None
    return {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_program(fn: Callable, args: Sequence[Any], *,
                    compiler_options: dict | None = None) -> ProgramReport:
    """Lowers `fn(*args)` (sharded ShapeDtypeStructs), compiles it and reads its analyses.

    `fn` may already be jitted (its own shardings and donation apply); a plain function is
    jitted here. Trace inside `parallel.mesh.activate(mesh)` so logical constraints bind.
    """
    import time
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    start = time.perf_counter()
    lowered = jitted.lower(*args)
    compiled = (lowered.compile(compiler_options=compiler_options) if compiler_options
                else lowered.compile())
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = _cost(compiled)
    return ProgramReport(
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        compile_seconds=seconds)


def extrapolate_layers(one: float, two: float, num_layers: int) -> float:
    """A cost that is a + b * layers, from its values at 1 and 2 layers, at `num_layers`."""
    return one + (two - one) * (num_layers - 1)


def step_seconds(flops: float, bytes_accessed: float, *, peak_tflops: float,
                 hbm_gbps: float) -> float:
    """Roofline time of one program on one device: max(FLOPs / peak, bytes / bandwidth).

    0 when no peak is declared. Communication is not modelled.
    """
    if peak_tflops <= 0:
        return 0.0
    compute = flops / (peak_tflops * 1e12)
    memory = bytes_accessed / (hbm_gbps * 1e9) if hbm_gbps > 0 else 0.0
    return max(compute, memory)
