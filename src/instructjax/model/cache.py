"""The key/value cache of incremental decoding: one pytree holding every layer's keys and values.

Layout: `k` and `v` are [L, B, S, K, D] (layers, batch, cache slots, kv heads, head dim). The
leading layers axis matches the scanned parameters, so `nn.scan` hands each block its own
[B, S, K, D] slice through `in_axes=0`, exactly as it hands each block its parameters.

Slots are shared by the whole batch: slot s of every row was written by the same call, so a
batch of left-padded prompts keeps one write index for all rows and marks the padding slots
with a key mask (`kv_mask` [B, S], 1 = real token) that the caller owns. The cache holds
nothing but the two arrays; the write index and the mask live with the caller (the rollout
loop), which already carries them.

Letters: L layers, B batch, S cache slots, T new tokens per call, K kv heads, D head dim.
"""
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

# Logical names of the cache dims, for a sharded rollout (parallel/mesh.py maps them to mesh
# axes): batch like the activations, kv heads like the key/value projections' outputs, and
# the slot axis as an activation length.
CACHE_AXES = ("layers", "activation_batch", "activation_length", "activation_kv_heads",
              "head_dim")
# The same names for the [B, S, K, D] slice one layer sees.
LAYER_CACHE_AXES = CACHE_AXES[1:]


@flax.struct.dataclass
class KVCache:
    """Keys and values of every cache slot, after RoPE (keys) and in the cache dtype.

    Attributes:
        k: [L, B, S, K, D] keys (or [B, S, K, D] for the slice of one layer).
        v: same shape and dtype as k, the values.
    """

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self):
        """S, the number of slots (static: read from the shape)."""
        return self.k.shape[-3]

    def write(self, chunk, index):
        """The cache with `chunk` written at slots index .. index + T - 1 of every row.

        Args:
            chunk: a KVCache whose k, v have this cache's shape except T slots in place of S
                ([L, B, T, K, D], or [B, T, K, D] for a layer slice); cast to the cache dtype.
            index: int scalar (may be traced), the first slot written, the same for all rows.
                index + T must be <= S: dynamic_update_slice would clamp a start that runs
                past the end and silently overwrite earlier slots instead.

        Returns:
            A KVCache of the same shape and dtype.
        """
        def put(full, new):
            start = (0,) * (full.ndim - 3) + (index, 0, 0)
            return jax.lax.dynamic_update_slice(full, new.astype(full.dtype), start)

        return KVCache(k=put(self.k, chunk.k), v=put(self.v, chunk.v))


def init_cache(cfg, batch, max_len, dtype=None):
    """An all-zero cache for `batch` rows of up to `max_len` tokens.

    Args:
        cfg: the ModelConfig of the model that will fill it.
        batch: B, rows decoded together.
        max_len: S, slots per row (prompt + generated tokens); at most cfg.max_seq_len.
        dtype: dtype of k and v; default cfg.dtype (the compute dtype the keys come out in).

    Returns:
        KVCache with k, v zeros of shape [cfg.num_layers, batch, max_len, cfg.num_kv_heads,
        cfg.head_dim].
    """
    if max_len > cfg.max_seq_len:
        raise ValueError(f"cache length {max_len} exceeds cfg.max_seq_len={cfg.max_seq_len}")
    dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def constrain(cache):
    """The cache with its logical sharding (CACHE_AXES) imposed on k and v.

    Inside `parallel.mesh.activate(mesh)` this pins the cache's layout -- rows over the
    batch axes (data, fsdp), kv heads over the tensor axis -- so the prefill and every
    decode step keep it in place; outside an active mesh it returns the cache unchanged.

    Args:
        cache: KVCache with k, v [L, B, S, K, D].

    Returns:
        The same KVCache values, sharding-constrained.
    """
    return KVCache(k=nn.with_logical_constraint(cache.k, CACHE_AXES),
                   v=nn.with_logical_constraint(cache.v, CACHE_AXES))


def logical_partition_specs():
    """A KVCache of logical PartitionSpecs (CACHE_AXES on k and v).

    For `nn.logical_to_mesh_sharding(logical_partition_specs(), mesh, rules)`: the shardings
    to create a cache with, or to pass as a jitted rollout's out_shardings.
    """
    spec = PartitionSpec(*CACHE_AXES)
    return KVCache(k=spec, v=spec)
