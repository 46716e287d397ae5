"""Device mesh, logical-axis rules and shardings for params, optimiser state and batches.

The mesh has three axes, always in this order:
  data   -- pure data parallelism (params replicated across it),
  fsdp   -- data parallelism with parameters and optimiser state sharded across it (ZeRO-3),
  tensor -- Megatron-style tensor parallelism over heads, MLP hidden units and vocabulary.
Model code names axes logically (`embed`, `heads`, ...); `LOGICAL_AXIS_RULES` is the one table
that maps those names onto mesh axes.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes, or None = replicated). Parameters use the short names,
# activations the `activation_*` names, so that `embed` can be FSDP-sharded on weights while
# the activations' embed dim stays whole (their batch dim already uses the fsdp axis).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


class MeshConfigError(ValueError):
    """A mesh that cannot be built or does not fit the model/batch."""


def resolve_mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Turns `{'data': d, 'fsdp': f, 'tensor': t}` (one of them may be -1) into a full shape.

    -1 means "all devices the other axes leave"; the product must equal `num_devices`.
    """
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise MeshConfigError(f"unknown mesh axes {sorted(unknown)}; valid axes: {list(MESH_AXES)}")
    shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    fill = [i for i, s in enumerate(shape) if s == -1]
    if len(fill) > 1:
        raise MeshConfigError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    if any(s == 0 or s < -1 for s in shape):
        raise MeshConfigError(f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
    known = math.prod(s for s in shape if s != -1)
    if fill:
        if num_devices % known:
            raise MeshConfigError(
                f"mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices do not divide by {known}")
        shape[fill[0]] = num_devices // known
    if math.prod(shape) != num_devices:
        raise MeshConfigError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
            f"but {num_devices} are available")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ('data','fsdp','tensor') mesh over `devices` (default: all global devices).

    Axis types stay Auto: flax linen's logical constraints need them (ENV-NOTES).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(sizes, len(devices))
    try:
        # Topology-aware ordering on real accelerators (keeps tensor axis within a host).
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (AssertionError, NotImplementedError, ValueError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def batch_axis_size(mesh: Mesh) -> int:
    """Number of shards the batch dimension is split into (data x fsdp)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a `[B, ...]` batch array: B over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, P())


def check_fits(mesh: Mesh, *, global_batch: int | None, num_heads: int, num_kv_heads: int,
               micro_batches: int = 1) -> None:
    """Raises MeshConfigError before compiling when batch or heads do not divide the mesh.

    global_batch None: only the heads are checked (PPO checks its own batch sizes, naming
    its own keys).
    """
    if global_batch is not None:
        shards = batch_axis_size(mesh)
        if global_batch % micro_batches:
            raise MeshConfigError(f"batch_size {global_batch} is not divisible by "
                                  f"grad_accum_steps {micro_batches}")
        micro = global_batch // micro_batches
        if micro % shards:
            raise MeshConfigError(
                f"per-step micro-batch {micro} (batch_size {global_batch} / grad_accum_steps "
                f"{micro_batches}) must divide over the batch axes data x fsdp = {shards}")
    tensor = mesh.shape["tensor"]
    if num_heads % tensor or num_kv_heads % tensor:
        raise MeshConfigError(
            f"num_heads {num_heads} and num_kv_heads {num_kv_heads} must both be divisible by "
            f"the tensor axis size {tensor}")


def logical_to_sharding(logical_specs: Any, mesh: Mesh,
                        rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES) -> Any:
    """Maps a pytree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def check_divisible(abstract_tree: Any, shardings: Any) -> None:
    """Raises MeshConfigError naming the first array whose dims do not divide their mesh axes."""
    flat_arrays = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    flat_shardings = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sharding in zip(flat_arrays, flat_shardings):
        for dim, axes in zip(leaf.shape, sharding.spec):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            parts = math.prod(sharding.mesh.shape[a] for a in axes)
            if dim % parts:
                raise MeshConfigError(
                    f"parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be "
                    f"split {parts} ways over mesh axes {axes}: change the mesh or model sizes")


def _dict_keys(path: tuple) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def shardings_like_params(tree: Any, param_shardings: Any, params_abstract: Any,
                          mesh: Mesh) -> Any:
    """Shardings for a pytree (e.g. optimiser state) whose leaves mirror parameters.

    A leaf whose dict-key path ends with a parameter's path and has the same shape takes that
    parameter's sharding (Adam's mu/nu); every other leaf (step counters, scalars) is
    replicated. Matching by path keeps this independent of the optax state classes.
    """
    by_path = {}
    for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(params_abstract)[0],
            jax.tree_util.tree_leaves(param_shardings,
                                      is_leaf=lambda x: isinstance(x, NamedSharding))):
        by_path[_dict_keys(path)] = (leaf.shape, sharding)

    def pick(path, leaf):
        keys = _dict_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == getattr(leaf, "shape", None):
                return hit[1]
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES):
    """Context in which model code traces: the mesh is current and logical names resolve.

    Trace (first-call) jitted model functions inside it so that `with_logical_constraint`
    in the model becomes real sharding constraints.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def shard_rows(x: jax.Array) -> jax.Array:
    """x [B, ...] with its rows over the batch mesh axes (data, fsdp), the rest replicated.

    A logical constraint ("activation_batch" on dim 0): a no-op outside `activate`. Used on
    the per-row buffers of the rollout and of PPO's chunked forwards and minibatches.
    """
    return nn.with_logical_constraint(x, ("activation_batch",) + (None,) * (x.ndim - 1))



def spec_without_axis(spec: P, axis: str) -> P:
    """`spec` with mesh axis `axis` removed from every dimension (that dim replicated on it).

    P('fsdp', 'tensor') -> P(None, 'tensor'); P(('data', 'fsdp'), None) -> P('data', None).
    """
    def drop(entry):
        if entry is None:
            return None
        kept = tuple(name for name in (entry if isinstance(entry, tuple) else (entry,))
                     if name != axis)
        return kept if len(kept) > 1 else (kept[0] if kept else None)
    return P(*(drop(entry) for entry in spec))


def decoding_shardings(shardings: Any) -> Any:
    """Param shardings for token-by-token decoding: the same, gathered over the fsdp axis.

    FSDP shards weights so that a training step gathers each layer once per batch of
    thousands of tokens; a decode step would repeat that gather for every generated token.
    Decoding from a copy replicated over fsdp (still split over tensor) gathers once per
    rollout instead.
    """
    return jax.tree.map(lambda s: NamedSharding(s.mesh, spec_without_axis(s.spec, "fsdp")),
                        shardings)


def make_decoding_copy(param_shardings: Any, dtype: Any) -> Callable[[Any], Any]:
    """A jitted params -> copy in `dtype` (e.g. the model's bf16 compute dtype), fsdp-gathered.

    Built once per run and called once per rollout (one compile, not one per call).

    Args:
        param_shardings: pytree of the params' NamedShardings.
        dtype: floating dtype of the copy; integer leaves keep theirs.

    Returns:
        A function mapping a params pytree of sharded jax.Arrays to the same pytree, floating
        leaves in `dtype`, laid out by `decoding_shardings`.
    """
    dtype = np.dtype(dtype)

    def cast(tree):
        return jax.tree.map(lambda x: x.astype(dtype) if np.issubdtype(x.dtype, np.floating)
                            else x, tree)
    return jax.jit(cast, out_shardings=decoding_shardings(param_shardings))
