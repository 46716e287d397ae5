"""Flash attention for training: Pallas forward and backward with causal masking, packed
segments and grouped-query heads.

Semantics are exactly those of `kernels/reference.py::attention` (the plain-jnp oracle beside
this file): q [B, T, H, D], k and v [B, S, K, D], query head h reads kv head h // (H // K),
segment id 0 is padding, and a query that sees no key gets 0 with zero gradients.

Algorithm (Dao et al., FlashAttention-2, arXiv:2307.08691, Alg. 1 and 2):
- forward: one program per (batch, query head, query block); it walks the kv blocks with an
  online softmax (running max and sum in float32) and writes the output and the float32
  log-sum-exp (LSE) of each row;
- backward: delta = rowsum(o * do) in plain jnp, then a dK/dV kernel (one program per
  (batch, kv head, kv block), looping over the G query heads of its group and over the
  query blocks, so GQA is reduced inside the kernel without atomics) and a dQ kernel (one
  program per (batch, query head, query block), looping over kv blocks).

Block skipping: a (query block, kv block) pair is SKIP (nothing visible: the kv block is
entirely after the query block under causality, or the blocks' segment-id ranges cannot
overlap, or one side is all padding), FULL (every pair visible: no elementwise mask) or MASKED.
`block_kind` decides it from block index ranges and the per-block min/max of the segment ids;
the min/max tables and each row block's [first, last) range of non-skipped blocks are computed
outside the kernels (`block_kind_table`, `_visit_ranges`) and passed in. Causal attention
without segment ids needs no tables: the ranges are closed-form (`causal_block_ranges`).

Lengths that are not a multiple of the block size are padded inside the wrapper: padded keys
get segment id 0 (masked), padded rows are sliced off. Under causal masking without segment
ids no mask is needed for the padding: padded keys come after every real query.

Backends (picked from `jax.default_backend()` unless `interpret=True`):
- interpret: the same pallas_call run by the Pallas interpreter (CPU tests).
- gpu: the Triton backend (`pallas.triton.CompilerParams` with num_warps/num_stages). Only
  Triton is implemented for GPU: this kernel is written in the array-per-program style that
  Triton lowers and the interpreter runs, so one formulation is tested on CPU and runs on
  GPU. A Mosaic GPU kernel (plgpu: warpgroup MMA, TMA pipelines, explicit barriers) is a
  different program that cannot run in interpret mode; it would be the faster choice on
  Hopper (see /work/shared/KERNEL-ANCHORS.md) and is the next step once it can be measured.
- tpu: Mosaic TPU with all grid axes "parallel". TPU tiling needs [B, H, T, D] blocks, so the
  wrapper transposes to that layout. Each program holds whole rows in VMEM (one head's K/V in
  the forward and dQ kernels, the group's Q and dO in dK/dV), which bounds the sequence
  length to a few thousand tokens at D = 128; a production TPU kernel would put the kv (or
  q) blocks on an "arbitrary" grid axis with scratch accumulators. Unmeasured.
The GPU and TPU paths are checked by lowering from CPU (tests/kernels), never run here.

Letters: B batch, T query length, S key length, H query heads, K kv heads, G = H // K,
D head dim; bq / bk query / kv block sizes.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

# Block kinds (values of block_kind / block_kind_table).
SKIP, FULL, MASKED = 0, 1, 2

# Score fill for masked entries. Finite (not -inf) so that a row whose entries are all masked
# so far has max == fill and exp(fill - fill) stays finite; those entries are then zeroed
# explicitly. 0.7 * max leaves room to subtract any real score without overflow.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


# ------------------------------------------------------------------------------------------
# Block sizes
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the three kernels and, on GPU, Triton's launch parameters.

    block_q / block_kv: query rows per program and kv rows per loop step in the forward.
    block_q_bwd / block_kv_bwd: the same for both backward kernels (dK/dV programs own
    block_kv_bwd keys and step over block_q_bwd queries; dQ programs the other way round).
    num_warps / num_stages: Triton only; None = chosen from the head dim.
    Blocks are clamped to the (power-of-two rounded) sequence length for short inputs.
    """
    block_q: int = 128
    block_kv: int = 128
    block_q_bwd: int = 128
    block_kv_bwd: int = 128
    num_warps: int | None = None
    num_stages: int | None = None

    @classmethod
    def default(cls, backend: str | None = None) -> "BlockSizes":
        """Defaults for `backend` ('gpu', 'tpu', 'cpu'; None = jax.default_backend()).

        GPU: the FlashAttention-2 Triton shapes (128 x 64 forward, 64 x 64 backward, 2
        pipeline stages) that fit an SM's shared memory at D = 128 in bf16. TPU and the CPU
        interpreter: 128 x 128 (TPU lane width; for the interpreter larger blocks only mean
        fewer loop steps).
        """
        backend = backend or jax.default_backend()
        if backend == "gpu":
            return cls(block_q=128, block_kv=64, block_q_bwd=64, block_kv_bwd=64, num_stages=2)
        return cls()


# ------------------------------------------------------------------------------------------
# Which blocks to visit (shared by the kernels and the tests)
# ------------------------------------------------------------------------------------------

def block_kind(q_first, q_last, k_first, k_last, q_seg=None, k_seg=None, *, causal):
    """SKIP, FULL or MASKED for a block of queries [q_first, q_last] x keys [k_first, k_last].

    Works elementwise on jnp arrays (for tables) and on the scalars a kernel reads.

    Args:
        q_first, q_last, k_first, k_last: int, first and last index of each block.
        q_seg, k_seg: optional (min, max, pure) of the segment ids of the query / key block
            (see segment_block_bounds); ids are >= 0 with 0 = padding. None = no segment
            masking.
        causal: whether query t only sees keys s <= t.

    Returns:
        int32 block kind.
    """
    skip = jnp.zeros_like(q_first, dtype=jnp.bool_)
    full = jnp.ones_like(q_first, dtype=jnp.bool_)
    if causal:
        skip = skip | (k_first > q_last)
        full = full & (k_last <= q_first)
    if q_seg is not None:
        (q_min, q_max, q_pure), (k_min, k_max, k_pure) = q_seg, k_seg
        # Disjoint id ranges share no segment; a max of 0 means the block is all padding.
        skip = skip | (q_max < k_min) | (k_max < q_min) | (q_max == 0) | (k_max == 0)
        full = full & (q_pure == 1) & (k_pure == 1) & (q_max == k_max)
    return jnp.where(skip, SKIP, jnp.where(full, FULL, MASKED)).astype(jnp.int32)


def segment_block_bounds(segment_ids, block):
    """Per-block summary of segment ids: int [B, L] -> (min, max, pure), int32 [B, L // block].

    min is taken over the non-padding ids, so a document tail followed by padding does not
    widen the block's range down to 0 (all-padding blocks get min = max = 0); pure is 1 when
    the block is one document with no padding (the condition for FULL).
    """
    B, L = segment_ids.shape
    blocks = segment_ids.astype(jnp.int32).reshape(B, L // block, block)
    hi = blocks.max(axis=-1)
    lo = jnp.where(blocks == 0, jnp.iinfo(jnp.int32).max, blocks).min(axis=-1)
    lo = jnp.where(hi == 0, 0, lo)
    pure = (blocks.min(axis=-1) == hi) & (hi != 0)
    return lo, hi, pure.astype(jnp.int32)


def block_kind_table(q_segment_ids, kv_segment_ids, block_q, block_kv, *, causal):
    """Kind of every (query block, kv block) pair.

    Args:
        q_segment_ids: int [B, T] or None; kv_segment_ids: int [B, S] or None (both or
            neither). T and S must be multiples of block_q and block_kv.
        block_q, block_kv: block sizes.
        causal: causal masking.

    Returns:
        int32 [B, T // block_q, S // block_kv] of SKIP / FULL / MASKED ([1, ...] without
        segment ids).
    """
    if q_segment_ids is None:
        raise ValueError("block_kind_table needs segment ids; without them the kinds depend "
                         "on causality only (see causal_block_ranges)")
    nq = q_segment_ids.shape[1] // block_q
    nk = kv_segment_ids.shape[1] // block_kv
    i = jnp.arange(nq, dtype=jnp.int32)[None, :, None]
    j = jnp.arange(nk, dtype=jnp.int32)[None, None, :]
    q_bounds = segment_block_bounds(q_segment_ids, block_q)
    k_bounds = segment_block_bounds(kv_segment_ids, block_kv)
    return block_kind(i * block_q, i * block_q + block_q - 1,
                      j * block_kv, j * block_kv + block_kv - 1,
                      tuple(x[:, :, None] for x in q_bounds),
                      tuple(x[:, None, :] for x in k_bounds), causal=causal)


def _visit_ranges(kinds_BRC):
    """[lo, hi) of the non-SKIP columns of each row: int32 [B, R, C] -> two int32 [B, R].

    Rows with nothing to visit get lo = hi = 0. Inside [lo, hi) SKIP blocks can still occur
    (segment ranges need not be sorted); the kernels test each block's kind again.
    """
    C = kinds_BRC.shape[-1]
    visit = kinds_BRC != SKIP
    any_visit = visit.any(axis=-1)
    lo = jnp.argmax(visit, axis=-1)
    hi = C - jnp.argmax(visit[..., ::-1], axis=-1)
    return (jnp.where(any_visit, lo, 0).astype(jnp.int32),
            jnp.where(any_visit, hi, 0).astype(jnp.int32))


def causal_block_ranges(row, row_block, col_block, n_cols, *, rows_are_queries):
    """Causal attention without segments: the column blocks a row block visits, as runs.

    For a query block i (rows_are_queries) the kv blocks [0, mid) are FULL and [mid, hi)
    MASKED (they cross the diagonal); for a kv block j the query blocks [lo, mid) are MASKED
    and [mid, n_cols) FULL. Everything else is SKIP. Uses lax.div on non-negative ints (works
    on Python ints and on traced kernel scalars alike).

    Returns:
        ((start, stop, masked), (start, stop, masked)): two runs in visiting order.
    """
    if rows_are_queries:
        bq, bk = row_block, col_block
        hi = jnp.minimum(lax.div((row + 1) * bq + bk - 1, bk), n_cols)
        mid = jnp.minimum(lax.div(row * bq + 1, bk), hi)
        return (0, mid, False), (mid, hi, True)
    bk, bq = row_block, col_block
    lo = jnp.minimum(lax.div(row * bk, bq), n_cols)
    mid = jnp.maximum(jnp.minimum(lax.div((row + 1) * bk - 1 + bq - 1, bq), n_cols), lo)
    return (lo, mid, True), (mid, n_cols, False)


# ------------------------------------------------------------------------------------------
# Static configuration of one call
# ------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about a call: hashable, so it is a nondiff arg of the custom_vjp."""
    causal: bool
    segments: bool          # per-element segment masking (user ids or key padding)
    sm_scale: float
    block_q: int
    block_kv: int
    block_q_bwd: int
    block_kv_bwd: int
    num_warps: int | None
    num_stages: int | None
    target: str             # 'interpret' | 'gpu' | 'tpu'

    @property
    def heads_major(self):
        """Kernel arrays are [B, H, T, D] on TPU (tiling), [B, T, H, D] elsewhere."""
        return self.target == "tpu"


def _compiler_params(cfg, num_grid_dims):
    if cfg.target == "gpu":
        from jax.experimental.pallas import triton as plt
        return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.target == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * num_grid_dims)
    return None


def _whole_array_spec(cfg):
    """Spec for the small int tables, read as scalars: SMEM on TPU, whole array elsewhere."""
    if cfg.target == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec()


def _seq_spec(cfg, block, D, index_map):
    """[block, D] tiles of a [B, T, H, D] (or [B, H, T, D]) array.

    index_map(*grid) -> (b, head, seq_block).
    """
    if cfg.heads_major:
        return pl.BlockSpec((None, None, block, D),
                            lambda *g: _heads_major_index(index_map(*g)))
    return pl.BlockSpec((None, block, None, D),
                        lambda *g: _token_major_index(index_map(*g)))


def _heads_major_index(bhs):
    b, h, s = bhs
    return b, h, s, 0


def _token_major_index(bhs):
    b, h, s = bhs
    return b, s, h, 0


def _group_spec(cfg, G, length, D):
    """All G query heads of kv head `kh`, whole sequence: grid (b, kh, _) -> [T, G, D]."""
    if cfg.heads_major:
        return pl.BlockSpec((None, G, length, D), lambda b, kh, j: (b, kh, 0, 0))
    return pl.BlockSpec((None, length, G, D), lambda b, kh, j: (b, 0, kh, 0))


def _group_rows(cfg, ref, g, start, size):
    """Rows [start, start + size) of head g of a group block ref -> [size, D]."""
    if cfg.heads_major:
        return ref[g, pl.ds(start, size), :]
    return ref[pl.ds(start, size), g, :]


# ------------------------------------------------------------------------------------------
# Kernel building blocks
# ------------------------------------------------------------------------------------------

def _dot_nt(a, b):
    """a [M, D] x b [N, D] -> [M, N] float32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a [M, N] x b [M, D] -> [N, D] float32."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):
    """a [M, N] x b [N, D] -> [M, D] float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _element_mask(cfg, q_start, bq, k_start, bk, q_seg, k_seg):
    """bool [bq, bk]: which (query, key) pairs of a MASKED block are visible."""
    mask = jnp.ones((bq, bk), jnp.bool_)
    if cfg.causal:
        q_idx = q_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        k_idx = k_start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        mask = mask & (q_idx >= k_idx)
    if cfg.segments:
        mask = mask & (q_seg[:, None] == k_seg[None, :]) & (q_seg[:, None] != 0)
    return mask


def _visit_blocks(cfg, step, carry, *, row, n_cols, row_block, col_block, rows_are_queries,
                  tables):
    """Run carry = step(col, carry, masked) over the column blocks row block `row` must see.

    `masked` is static: unmasked blocks run without any elementwise select.

    Args:
        tables: (row_tab_ref, col_tab_ref, b) in segment mode, else None. row_tab[b, r] =
            (seg min, seg max, pure, lo, hi) of row block r (segment_block_bounds, then the
            [lo, hi) range of blocks to visit); col_tab[b, c] = (seg min, seg max, pure).
    """
    def run(start, stop, masked, c):
        return lax.fori_loop(start, stop, lambda col, c: step(col, c, masked), c)

    if cfg.segments:
        row_tab, col_tab, b = tables
        r_seg = (row_tab[b, row, 0], row_tab[b, row, 1], row_tab[b, row, 2])
        lo, hi = row_tab[b, row, 3], row_tab[b, row, 4]
        r_first = row * row_block
        r_last = r_first + row_block - 1

        def body(col, c):
            c_seg = (col_tab[b, col, 0], col_tab[b, col, 1], col_tab[b, col, 2])
            c_first = col * col_block
            c_last = c_first + col_block - 1
            if rows_are_queries:
                kind = block_kind(r_first, r_last, c_first, c_last, r_seg, c_seg,
                                  causal=cfg.causal)
            else:
                kind = block_kind(c_first, c_last, r_first, r_last, c_seg, r_seg,
                                  causal=cfg.causal)
            return lax.switch(kind, [lambda c: c,
                                     lambda c: step(col, c, False),
                                     lambda c: step(col, c, True)], c)

        return lax.fori_loop(lo, hi, body, carry)
    if cfg.causal:
        for start, stop, masked in causal_block_ranges(
                row, row_block, col_block, n_cols, rows_are_queries=rows_are_queries):
            carry = run(start, stop, masked, carry)
        return carry
    return run(0, n_cols, False, carry)


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------

def _fwd_kernel(*refs, cfg, n_kv):
    """One (b, h, query block) program: online softmax over the visible kv blocks.

    Refs (segment mode adds the two tables first and the two segment-id refs after v):
        q [bq, D], k / v [S, D] (the whole row of kv head h // G), q_seg [bq], kv_seg [S];
        outputs o [bq, D], lse [bq] float32 (-inf for rows that see nothing).
    """
    if cfg.segments:
        row_tab, col_tab, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    b, i = pl.program_id(0), pl.program_id(2)
    bq, bk = cfg.block_q, cfg.block_kv
    q = q_ref[...]
    q_seg = qseg_ref[...] if cfg.segments else None

    def step(j, carry, masked):
        m, l, acc = carry
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        s = _dot_nt(q, k) * cfg.sm_scale
        if masked:
            k_seg = kseg_ref[pl.ds(k_start, bk)] if cfg.segments else None
            mask = _element_mask(cfg, i * bq, bq, k_start, bk, q_seg, k_seg)
            s = jnp.where(mask, s, _MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.exp(s - m_new[:, None])
        if masked:
            # Entries of a row that is all-masked so far are exp(0) = 1 here: zero them.
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return m_new, l, acc

    D = q.shape[-1]
    carry = (jnp.full((bq,), _MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
             jnp.zeros((bq, D), jnp.float32))
    tables = (row_tab, col_tab, b) if cfg.segments else None
    m, l, acc = _visit_blocks(cfg, step, carry, row=i, n_cols=n_kv, row_block=bq,
                              col_block=bk, rows_are_queries=True, tables=tables)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _dq_kernel(*refs, cfg, n_kv):
    """One (b, h, query block) program: dq = scale * sum_j dS_j K_j.

    Refs: [row_tab, col_tab,] q [bq, D], k / v [S, D], do [bq, D], lse [bq], delta [bq],
        [q_seg [bq], kv_seg [S],] output dq [bq, D].
    """
    if cfg.segments:
        (row_tab, col_tab, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref,
         kseg_ref, dq_ref) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    b, i = pl.program_id(0), pl.program_id(2)
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg = qseg_ref[...] if cfg.segments else None

    def step(j, dq, masked):
        k_start = pl.multiple_of(j * bk, bk)
        k = k_ref[pl.ds(k_start, bk), :]
        v = v_ref[pl.ds(k_start, bk), :]
        p = jnp.exp(_dot_nt(q, k) * cfg.sm_scale - lse[:, None])
        if masked:
            k_seg = kseg_ref[pl.ds(k_start, bk)] if cfg.segments else None
            # Also covers empty rows: their lse is -inf and p is inf before this select.
            p = jnp.where(_element_mask(cfg, i * bq, bq, k_start, bk, q_seg, k_seg), p, 0.0)
        ds = p * (_dot_nt(do, v) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    tables = (row_tab, col_tab, b) if cfg.segments else None
    dq = _visit_blocks(cfg, step, jnp.zeros(q.shape, jnp.float32), row=i, n_cols=n_kv,
                       row_block=bq, col_block=bk, rows_are_queries=True, tables=tables)
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, cfg, n_q, G):
    """One (b, kv head, kv block) program: dk, dv summed over the G query heads and the
    visible query blocks (so GQA needs no atomics).

    Refs: [row_tab, col_tab,] q / do: the group's whole rows ([T, G, D] or [G, T, D]),
        k / v [bk, D], lse / delta [G, T], [q_seg [T], kv_seg [bk],] outputs dk, dv [bk, D].
    """
    if cfg.segments:
        (row_tab, col_tab, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref,
         kseg_ref, dk_ref, dv_ref) = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    b, j = pl.program_id(0), pl.program_id(2)
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    k, v = k_ref[...], v_ref[...]
    k_seg = kseg_ref[...] if cfg.segments else None
    tables = (row_tab, col_tab, b) if cfg.segments else None

    def head(g, carry):
        def step(i, carry, masked):
            dk, dv = carry
            q_start = pl.multiple_of(i * bq, bq)
            q = _group_rows(cfg, q_ref, g, q_start, bq)
            do = _group_rows(cfg, do_ref, g, q_start, bq)
            lse = lse_ref[g, pl.ds(q_start, bq)]
            delta = delta_ref[g, pl.ds(q_start, bq)]
            p = jnp.exp(_dot_nt(q, k) * cfg.sm_scale - lse[:, None])
            if masked:
                q_seg = qseg_ref[pl.ds(q_start, bq)] if cfg.segments else None
                p = jnp.where(_element_mask(cfg, q_start, bq, j * bk, bk, q_seg, k_seg),
                              p, 0.0)
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            ds = p * (_dot_nt(do, v) - delta[:, None])
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
            return dk, dv

        return _visit_blocks(cfg, step, carry, row=j, n_cols=n_q, row_block=bk,
                             col_block=bq, rows_are_queries=False, tables=tables)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, G, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# ------------------------------------------------------------------------------------------
# pallas_calls
# ------------------------------------------------------------------------------------------

def _dims(cfg, q, k):
    """(B, T, H, D, S, K) of kernel-layout arrays."""
    if cfg.heads_major:
        (B, H, T, D), (S, K) = q.shape, (k.shape[2], k.shape[1])
    else:
        (B, T, H, D), (S, K) = q.shape, k.shape[1:3]
    return B, T, H, D, S, K


def _tables(q_seg, kv_seg, row_block, col_block, causal, rows_are_queries):
    """(row_tab [B, R, 5], col_tab [B, C, 3]) int32 for _visit_blocks, from [B, 1, L] ids."""
    q_ids, kv_ids = q_seg[:, 0, :], kv_seg[:, 0, :]
    if rows_are_queries:
        row_ids, col_ids = q_ids, kv_ids
        kinds = block_kind_table(q_ids, kv_ids, row_block, col_block, causal=causal)
    else:
        row_ids, col_ids = kv_ids, q_ids
        kinds = block_kind_table(q_ids, kv_ids, col_block, row_block,
                                 causal=causal).transpose(0, 2, 1)
    lo, hi = _visit_ranges(kinds)
    return (jnp.stack([*segment_block_bounds(row_ids, row_block), lo, hi], axis=-1),
            jnp.stack(segment_block_bounds(col_ids, col_block), axis=-1))


def _lse_spec(block):
    """[block] tiles of a [B, H, 1, T] float32 row statistic for grid (b, h, block i).

    The unit axis keeps TPU's last-two-dims tiling rule satisfied without a rank-1 block.
    """
    return pl.BlockSpec((None, None, None, block), lambda b, h, i: (b, h, 0, i))


def _fwd_call(cfg, q, k, v, q_seg, kv_seg):
    """Forward pallas_call on kernel-layout arrays -> (o like q, lse float32 [B, H, 1, T])."""
    B, T, H, D, S, K = _dims(cfg, q, k)
    G = H // K
    bq, bk = cfg.block_q, cfg.block_kv
    q_map = lambda b, h, i: (b, h, i)
    kv_map = lambda b, h, i: (b, lax.div(h, G), 0)
    in_specs = [_seq_spec(cfg, bq, D, q_map), _seq_spec(cfg, S, D, kv_map),
                _seq_spec(cfg, S, D, kv_map)]
    args = [q, k, v]
    if cfg.segments:
        row_tab, col_tab = _tables(q_seg, kv_seg, bq, bk, cfg.causal, True)
        in_specs = ([_whole_array_spec(cfg)] * 2 + in_specs +
                    [pl.BlockSpec((None, None, bq), lambda b, h, i: (b, 0, i)),
                     pl.BlockSpec((None, None, S), lambda b, h, i: (b, 0, 0))])
        args = [row_tab, col_tab] + args + [q_seg, kv_seg]
    o, lse = pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, n_kv=S // bk),
        grid=(B, H, T // bq),
        in_specs=in_specs,
        out_specs=[_seq_spec(cfg, bq, D, q_map), _lse_spec(bq)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, 1, T), jnp.float32)],
        compiler_params=_compiler_params(cfg, 3),
        interpret=cfg.target == "interpret",
        name="flash_attention_fwd",
    )(*args)
    return o, lse


def _dq_call(cfg, q, k, v, do, lse, delta, q_seg, kv_seg):
    B, T, H, D, S, K = _dims(cfg, q, k)
    G = H // K
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    q_map = lambda b, h, i: (b, h, i)
    kv_map = lambda b, h, i: (b, lax.div(h, G), 0)
    in_specs = [_seq_spec(cfg, bq, D, q_map), _seq_spec(cfg, S, D, kv_map),
                _seq_spec(cfg, S, D, kv_map), _seq_spec(cfg, bq, D, q_map),
                _lse_spec(bq), _lse_spec(bq)]
    args = [q, k, v, do, lse, delta]
    if cfg.segments:
        row_tab, col_tab = _tables(q_seg, kv_seg, bq, bk, cfg.causal, True)
        in_specs = ([_whole_array_spec(cfg)] * 2 + in_specs +
                    [pl.BlockSpec((None, None, bq), lambda b, h, i: (b, 0, i)),
                     pl.BlockSpec((None, None, S), lambda b, h, i: (b, 0, 0))])
        args = [row_tab, col_tab] + args + [q_seg, kv_seg]
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, n_kv=S // bk),
        grid=(B, H, T // bq),
        in_specs=in_specs,
        out_specs=_seq_spec(cfg, bq, D, q_map),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_compiler_params(cfg, 3),
        interpret=cfg.target == "interpret",
        name="flash_attention_dq",
    )(*args)


def _dkdv_call(cfg, q, k, v, do, lse, delta, q_seg, kv_seg):
    B, T, H, D, S, K = _dims(cfg, q, k)
    G = H // K
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    kv_map = lambda b, kh, j: (b, kh, j)
    stat_spec = pl.BlockSpec((None, G, None, T), lambda b, kh, j: (b, kh, 0, 0))
    in_specs = [_group_spec(cfg, G, T, D), _seq_spec(cfg, bk, D, kv_map),
                _seq_spec(cfg, bk, D, kv_map), _group_spec(cfg, G, T, D), stat_spec, stat_spec]
    args = [q, k, v, do, lse, delta]
    if cfg.segments:
        row_tab, col_tab = _tables(q_seg, kv_seg, bk, bq, cfg.causal, False)
        in_specs = ([_whole_array_spec(cfg)] * 2 + in_specs +
                    [pl.BlockSpec((None, None, T), lambda b, kh, j: (b, 0, 0)),
                     pl.BlockSpec((None, None, bk), lambda b, kh, j: (b, 0, j))])
        args = [row_tab, col_tab] + args + [q_seg, kv_seg]
    return pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg, n_q=T // bq, G=G),
        grid=(B, K, S // bk),
        in_specs=in_specs,
        out_specs=[_seq_spec(cfg, bk, D, kv_map), _seq_spec(cfg, bk, D, kv_map)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_compiler_params(cfg, 3),
        interpret=cfg.target == "interpret",
        name="flash_attention_dkdv",
    )(*args)


# ------------------------------------------------------------------------------------------
# custom_vjp on padded, kernel-layout arrays
# ------------------------------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, q_seg, kv_seg):
    """(o like q, lse float32 [B, H, 1, T]) on padded kernel-layout arrays."""
    return _fwd_call(cfg, q, k, v, q_seg, kv_seg)


def _flash_fwd(cfg, q, k, v, q_seg, kv_seg):
    o, lse = _fwd_call(cfg, q, k, v, q_seg, kv_seg)
    return (o, lse), (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg, res, cotangents):
    q, k, v, q_seg, kv_seg, o, lse = res
    do, dlse = cotangents
    # delta_t = sum_d o_td do_td, the row term of the softmax backward. d lse / d s = p, so
    # an LSE cotangent enters as ds = p * (dp - (delta - dlse)): it only shifts delta.
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    if not cfg.heads_major:
        delta = delta.transpose(0, 2, 1)                       # [B, T, H] -> [B, H, T]
    delta = delta[:, :, None, :] - dlse
    do = do.astype(q.dtype)
    dq = _dq_call(cfg, q, k, v, do, lse, delta, q_seg, kv_seg)
    dk, dv = _dkdv_call(cfg, q, k, v, do, lse, delta, q_seg, kv_seg)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------
# Public wrapper
# ------------------------------------------------------------------------------------------

def _next_power_of_2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _clamp_block(block, length):
    """Shrink a block to the sequence (next power of two, at least 16: Triton's dot minimum)."""
    return min(block, max(16, _next_power_of_2(length)))


def _round_up(x, m):
    return -(-x // m) * m


def flash_attention(q, k, v, *, segment_ids=None, causal=True, sm_scale=None,
                    block_sizes=None, interpret=False, return_lse=False, _target=None):
    """Flash attention with causal masking, packed segments and grouped-query heads.

    Differentiable in q, k, v (custom_vjp with Pallas backward kernels).

    Args:
        q: [B, T, H, D] float32 or bfloat16 queries.
        k, v: [B, S, K, D], same dtype; H a multiple of K; query head h uses kv head
            h // (H // K).
        segment_ids: optional int [B, T] shared by queries and keys (T == S), ids >= 0,
            0 = padding. Tokens attend only within their segment; padding sees nothing.
        causal: query t only sees keys s <= t (requires T == S).
        sm_scale: multiplier of q.k before the softmax; default 1/sqrt(D).
        block_sizes: BlockSizes; default BlockSizes.default() for the backend.
        interpret: run in the Pallas interpreter (required on CPU).
        return_lse: also return the log-sum-exp of the scaled scores.
        _target: 'gpu' or 'tpu' to build that backend's kernels regardless of the default
            backend (for lowering checks on CPU); not for normal use.

    Returns:
        [B, T, H, D] in q.dtype (rows that see no key are 0), and with return_lse the float32
        log-sum-exp [B, H, T] (-inf for such rows).
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    if k.shape != (B, S, K, D) or v.shape != (B, S, K, D):
        raise ValueError(f"k {k.shape} and v {v.shape} must both be [B, S, K, D] with "
                         f"B={B}, D={D}")
    if H % K != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K})")
    if causal and T != S:
        raise ValueError(f"causal attention needs equal query and key lengths, got {T}, {S}")
    if segment_ids is not None and (segment_ids.shape != (B, T) or T != S):
        raise ValueError(f"segment_ids {segment_ids.shape} must be [B, T] = [{B}, {T}] "
                         f"and needs T == S (S = {S})")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if _target is None:
        backend = jax.default_backend()
        if backend == "cpu" and not interpret:
            raise ValueError("flash_attention on CPU runs only in the Pallas interpreter: "
                             "pass interpret=True")
        target = "interpret" if interpret else backend
    else:
        target = _target
    if target not in ("interpret", "gpu", "tpu"):
        raise ValueError(f"no flash_attention kernels for backend {target!r}")
    if block_sizes is None:
        block_sizes = BlockSizes.default("cpu" if target == "interpret" else target)

    bq = _clamp_block(block_sizes.block_q, T)
    bqb = _clamp_block(block_sizes.block_q_bwd, T)
    bk = _clamp_block(block_sizes.block_kv, S)
    bkb = _clamp_block(block_sizes.block_kv_bwd, S)
    if T == S:
        # Equal padded lengths keep the causal diagonal arithmetic in block units exact.
        T_pad = S_pad = _round_up(T, math.lcm(bq, bqb, bk, bkb))
    else:
        T_pad, S_pad = _round_up(T, math.lcm(bq, bqb)), _round_up(S, math.lcm(bk, bkb))

    if segment_ids is not None:
        q_ids = kv_ids = segment_ids.astype(jnp.int32)
    elif S_pad != S and not causal:
        # Padded keys must be invisible: give real tokens segment 1 and padding 0.
        q_ids, kv_ids = jnp.ones((B, T), jnp.int32), jnp.ones((B, S), jnp.int32)
    else:
        q_ids = kv_ids = None
    segments = q_ids is not None
    if segments:
        q_seg = jnp.pad(q_ids, ((0, 0), (0, T_pad - T)))[:, None, :]
        kv_seg = jnp.pad(kv_ids, ((0, 0), (0, S_pad - S)))[:, None, :]
    else:
        q_seg = kv_seg = None

    num_warps = block_sizes.num_warps
    if target == "gpu" and num_warps is None:
        num_warps = 4 if D <= 64 else 8
    cfg = _Config(causal=causal, segments=segments,
                  sm_scale=float(D ** -0.5 if sm_scale is None else sm_scale),
                  block_q=bq, block_kv=bk, block_q_bwd=bqb, block_kv_bwd=bkb,
                  num_warps=num_warps, num_stages=block_sizes.num_stages, target=target)

    pad = lambda x, L: jnp.pad(x, ((0, 0), (0, L - x.shape[1]), (0, 0), (0, 0)))
    q_k, k_k, v_k = pad(q, T_pad), pad(k, S_pad), pad(v, S_pad)
    if cfg.heads_major:
        q_k, k_k, v_k = (x.transpose(0, 2, 1, 3) for x in (q_k, k_k, v_k))
    o, lse = _flash(cfg, q_k, k_k, v_k, q_seg, kv_seg)
    if cfg.heads_major:
        o = o.transpose(0, 2, 1, 3)
    o = o[:, :T]
    if return_lse:
        return o, lse[:, :, 0, :T]
    return o
