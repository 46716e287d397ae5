"""Hopper (sm_90) decode attention in Pallas Mosaic GPU: split-K flash-decoding with TMA.

Same program decomposition and partials as the Triton-formulation kernel in
decode.py (one program per (batch, kv head, split); float32 partial outputs
normalised within the split and their natural-log log-sum-exp, merged there in float32),
with the Hopper machinery of flash_mgpu.py:

- two warpgroups: a producer (`_stream`) TMA-copies the split's visible K, V and kv-mask
  blocks through `num_stages` shared-memory slots while the compute warpgroup works, so
  the cache is read at copy-engine speed with no address arithmetic in the compute loop;
- the G query heads of a kv head are the M rows of both wgmma matmuls, padded to the 64
  rows one warpgroup's wgmma needs (the padding rows are zero queries whose results are
  never stored). Decoding is bandwidth-bound, so the padded matmul work is free next to
  the cache reads: each K / V block is read once for the whole group;
- a split reads only blocks below its sequence's length (a dynamic trip count); the block
  that crosses the length has its value rows past the length zeroed in shared memory
  before the P V matmul (a masked weight of 0 times a stale NaN would poison the sum, see
  decode.py), then a proxy fence publishes the stores to the tensor cores.

Letters as in decode.py: B batch, K kv heads, G query heads per kv head, L
(padded) cache length, D head dim, N splits, bk cache block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from instructjax.kernels.decode import split_block_range
# _MASK_VALUE: the finite score fill for invisible entries (-inf would make a fully masked
# block's max -inf and exp2 NaN).
from instructjax.kernels.flash_mgpu import (
    _LN2, _LOG2E, _MASK_VALUE, _SUPPORTED_DTYPES, _launch, _slot, _smem_tiles, _stream)

ROWS = 64                      # wgmma M tile of one warpgroup: the padded query group

# Shared memory of an H100 / H200 block (227 KiB), less what alignment and barriers take.
_SMEM_BYTES = 227 * 1024 - 4096


def fitting_stages(head_dim: int, block_kv: int, itemsize: int = 2) -> int:
    """Most pipeline slots that fit shared memory next to Q and the float32 output tile.

    A slot holds a K and a V block (2 * block_kv * D elements) and a kv-mask block; Q takes
    64 * D elements and the output staging 64 * D float32. At D = 128 in bf16 with 64-row
    blocks: 48 KiB fixed + 32.25 KiB per slot, so 5 slots.
    """
    fixed = ROWS * head_dim * (itemsize + 4) + ROWS * 4
    per_slot = 2 * block_kv * head_dim * itemsize + block_kv * 4
    return (_SMEM_BYTES - fixed) // per_slot


def unsupported_reason(dtype, head_dim: int, group: int) -> str | None:
    """Why the Hopper decode kernel cannot run a call (None when it can)."""
    if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype).name} (needs bfloat16 or float16)"
    if head_dim % 64 or head_dim > 128:
        # D = 256: Q, the float32 output tile and two 64-row K/V slots take 229 KiB.
        return f"head dim {head_dim} (needs 64 or 128)"
    if group > ROWS:
        return f"{group} query heads per kv head (at most {ROWS})"
    return None


def _decode_body(len_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, q_smem, k_smem,
                 v_smem, mask_smem, o_smem, lse_smem, q_loaded, loaded, consumed, *, c, bk,
                 num_stages, blocks_per_split, group):
    """One (kv head, split, batch) program; `wg` 0 computes, 1 produces.

    Refs: lengths int32 [B]; q [B, K, 64, D] (G real rows); k / v [B, L, K, D]; mask int32
    [B, L]; outputs o float32 [B, K, N, G, D] and lse float32 [B, K, N, 64]. Scratch:
    q_smem [64, D], k_smem / v_smem [stages, bk, D], mask_smem int32 [stages, bk], o_smem
    float32 [64, D], lse_smem float32 [64]; loaded / consumed: (k, v, mask) barriers
    [stages], consumed with one arrival (the compute warpgroup).
    """
    h, s, b = lax.axis_index("heads"), lax.axis_index("splits"), lax.axis_index("batch")
    wg = lax.axis_index("wg")
    length = len_ref[b]
    first, last = split_block_range(s, length, bk, blocks_per_split)
    steps = last - first
    k_loaded, v_loaded, mask_loaded = loaded
    k_consumed, v_consumed, mask_consumed = consumed
    block_rows = lambda j: pl.ds((first + j) * bk, bk)
    streams = [(lambda j: k_ref.at[b, block_rows(j), h], k_smem, k_loaded, k_consumed),
               (lambda j: v_ref.at[b, block_rows(j), h], v_smem, v_loaded, v_consumed),
               (lambda j: mask_ref.at[b, block_rows(j)], mask_smem, mask_loaded,
                mask_consumed)]
    D = q_smem.shape[-1]
    layout = plgpu.Layout.WGMMA

    @pl.when(wg == 0)
    def _compute():
        plgpu.copy_gmem_to_smem(q_ref.at[b, h], q_smem, q_loaded)
        plgpu.barrier_wait(q_loaded)
        rows = layout.reduce(1)
        m = plgpu.layout_cast(jnp.full((ROWS,), _MASK_VALUE, jnp.float32), rows)
        l = plgpu.layout_cast(jnp.full((ROWS,), 0.0, jnp.float32), rows)
        acc = plgpu.layout_cast(jnp.full((ROWS, D), 0.0, jnp.float32), layout)

        def step(j, carry):
            acc, m, l = carry
            slot = _slot(j, num_stages)
            start = (first + j) * bk
            plgpu.barrier_wait(k_loaded.at[slot])

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                return acc_ref[...]

            raw = pl.run_scoped(scores, plgpu.ACC((ROWS, bk), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])
            plgpu.barrier_wait(mask_loaded.at[slot])
            kv_mask = plgpu.load(mask_smem.at[slot], (), layout=layout.reduce(0))
            plgpu.barrier_arrive(mask_consumed.at[slot])
            cols = start + plgpu.broadcasted_iota(jnp.int32, (ROWS, bk), 1, layout=layout)
            visible = (cols < length) & (lax.broadcast_in_dim(kv_mask, (ROWS, bk), [1]) != 0)
            t = jnp.where(visible, raw * c, _MASK_VALUE)
            m_new = jnp.maximum(m, t.max(axis=1))
            p = jnp.where(visible, jnp.exp2(t - lax.broadcast_in_dim(m_new, t.shape, [0])), 0.0)
            alpha = jnp.exp2(m - m_new)
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            plgpu.barrier_wait(v_loaded.at[slot])

            @pl.when(start + bk > length)
            def _():
                # The block crossing the length: zero the value rows past it.
                v = plgpu.load(v_smem.at[slot], (), layout=layout)
                v_rows = start + plgpu.broadcasted_iota(jnp.int32, (bk, D), 0, layout=layout)
                v_smem.at[slot][...] = jnp.where(v_rows < length, v, 0).astype(v.dtype)
                plgpu.commit_smem()

            def values(acc_ref):
                acc_ref[...] = acc
                plgpu.wgmma(acc_ref, p.astype(q_smem.dtype), v_smem.at[slot])
                return acc_ref[...]

            acc = pl.run_scoped(values, plgpu.ACC((ROWS, D), jnp.float32))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l

        acc, m, l = lax.fori_loop(0, steps, step, (acc, m, l))
        seen = l > 0.0
        l_safe = jnp.where(seen, l, 1.0)
        o_smem[...] = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
        lse_smem[...] = jnp.where(seen, (m + jnp.log2(l_safe)) * _LN2, -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, group)], o_ref.at[b, h, s])
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, s])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 1)
    def _produce():
        _stream(steps, num_stages, streams)


def decode_partials(q_BKRD, k_cache, v_cache, lengths, mask_BL, *, group, sm_scale,
                    block_kv, blocks_per_split, num_splits, num_stages=3, interpret=None):
    """Per-split partial outputs of the Hopper decode kernel.

    Args:
        q_BKRD: [B, K, 64, D] bfloat16 / float16 queries, the G heads of each kv head in the
            first `group` rows (the rest zero).
        k_cache, v_cache: [B, L, K, D] same dtype, L a multiple of block_kv.
        lengths: int32 [B], clamped to [0, L]; mask_BL: int32 [B, L], 0 hides a position.
        group: G; sm_scale: score multiplier (> 0); block_kv: cache rows per step (a
            multiple of 64; 64, the wrapper's default, keeps the [64, block_kv] float32
            score, mask and probability tiles small enough for one warpgroup's registers
            beside the [64, D] accumulator; larger blocks risk spills, unmeasured);
            blocks_per_split / num_splits: split k owns blocks
            [k * blocks_per_split, (k + 1) * blocks_per_split).
        num_stages: shared-memory slots of the streamed blocks, capped at blocks_per_split
            and at what fits (`fitting_stages`). Decoding is bandwidth-bound: 2-3 slots of
            32 KiB already keep more bytes in flight per multiprocessor than the memory
            latency needs.
        interpret: None to compile for the GPU, or an InterpretGPUParams (CPU tests).

    Returns:
        o float32 [B, K, N, G, D] normalised within each split, and lse float32 [B, K, N, G]
        (natural log; -inf where a split saw nothing), as decode.py combines them.
    """
    B, K, rows, D = q_BKRD.shape
    L = k_cache.shape[1]
    reason = unsupported_reason(q_BKRD.dtype, D, group)
    if reason is not None:
        raise ValueError(f"the Hopper decode kernel does not support {reason}")
    if rows != ROWS or block_kv % 64 or L % block_kv:
        raise ValueError(f"q rows {rows} must be {ROWS}, block_kv {block_kv} a multiple of "
                         f"64 dividing the cache length {L}")
    if not sm_scale > 0:
        raise ValueError(f"the Hopper decode kernel needs sm_scale > 0, got {sm_scale}")
    fit = fitting_stages(D, block_kv, jnp.dtype(q_BKRD.dtype).itemsize)
    if fit < 2:
        raise ValueError(f"block_kv {block_kv} at head dim {D} leaves room for {fit} pipeline "
                         "slot(s) in shared memory; use 64")
    stages = max(2, min(num_stages, blocks_per_split, fit))
    body = functools.partial(_decode_body, c=float(sm_scale) * _LOG2E, bk=block_kv,
                             num_stages=stages, blocks_per_split=blocks_per_split,
                             group=group)
    dtype = q_BKRD.dtype
    barriers = lambda arrivals: tuple(plgpu.Barrier(num_arrivals=arrivals, num_barriers=stages)
                                      for _ in range(3))
    scratch = (_smem_tiles((ROWS, D), dtype), _smem_tiles((stages, block_kv, D), dtype),
               _smem_tiles((stages, block_kv, D), dtype),
               plgpu.SMEM((stages, block_kv), jnp.int32), plgpu.SMEM((ROWS, D), jnp.float32),
               plgpu.SMEM((ROWS,), jnp.float32), plgpu.Barrier(), barriers(1), barriers(1))
    o, lse = _launch("decode_attention_hopper", body, scratch,
                     (lengths.astype(jnp.int32), q_BKRD, k_cache, v_cache,
                      mask_BL.astype(jnp.int32)),
                     out_type=(jax.ShapeDtypeStruct((B, K, num_splits, group, D), jnp.float32),
                               jax.ShapeDtypeStruct((B, K, num_splits, ROWS), jnp.float32)),
                     grid=(K, num_splits, B), grid_names=("heads", "splits", "batch"),
                     interpret=interpret, compute_warpgroups=1)
    return o, lse[..., :group]
