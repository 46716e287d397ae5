"""Which (query block, kv block) pairs an attention kernel must visit, and how it walks them.

Used by `kernels/flash.py` (all three kernels) and its tests. Attention is tiled
into query blocks of bq rows and kv blocks of bk rows; each pair of blocks is one of

- SKIP: no (query, key) pair in it is visible, so the kernel does not touch the block. Under
  causality the kv block lies entirely after the query block; with segment ids the two
  blocks' id ranges cannot overlap, or one side is all padding (id 0);
- FULL: every pair is visible, so the block runs without an elementwise mask (causal: the
  kv block lies entirely at or before the query block's first row; segments: both blocks
  are the same single document with no padding);
- MASKED: anything else; the kernel applies the elementwise mask.

`block_kind` decides this from the blocks' index ranges and a (min, max, pure) summary of
each block's segment ids (`segment_block_bounds`). It is conservative in one direction only:
min/max ranges of unsorted ids can overlap without sharing an id, so a block that could be
SKIP may come out MASKED (correct, just slower), never the other way round; FULL is exact.

How a kernel uses it. A kernel program owns one "row" block (a query block in the forward
and dQ kernels, a kv block in dK/dV) and loops over the "column" blocks of the other side
(`visit_blocks`):
- with segment ids, the per-block summaries and each row block's [lo, hi) range of
  non-SKIP columns are computed outside the kernel (`block_tables`) and passed in as small
  int32 tables; inside [lo, hi) the kernel recomputes each block's kind from the tables
  and switches on it (SKIP blocks can still occur there: ids need not be sorted);
- causal attention without segment ids needs no tables: the visited columns are two
  closed-form runs, one FULL and one MASKED (`causal_block_ranges`);
- neither: every block is FULL.

Letters: B batch, T query length, S key length, L either length; R / C row / column blocks.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

# Block kinds (values of block_kind / block_kind_table; also the lax.switch branch order in
# visit_blocks).
SKIP, FULL, MASKED = 0, 1, 2


# ------------------------------------------------------------------------------------------
# Block kinds
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
        q_segment_ids: int [B, T]; kv_segment_ids: int [B, S]. T and S must be multiples of
            block_q and block_kv.
        block_q, block_kv: block sizes.
        causal: causal masking.

    Returns:
        int32 [B, T // block_q, S // block_kv] of SKIP / FULL / MASKED.
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


def visit_ranges(kinds_BRC):
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
# Tables for the kernels, and the loop that reads them
# ------------------------------------------------------------------------------------------

def block_tables(q_segment_ids, kv_segment_ids, row_block, col_block, *, causal,
                 rows_are_queries):
    """The two int32 tables `visit_blocks` reads in segment mode.

    Args:
        q_segment_ids: int [B, T]; kv_segment_ids: int [B, S] (padded to the blocks).
        row_block, col_block: block sizes of the rows (the blocks a program owns) and of the
            columns it loops over: (bq, bk) if rows_are_queries, else (bk, bq).
        causal: causal masking.
        rows_are_queries: rows are query blocks (forward, dQ) or kv blocks (dK/dV).

    Returns:
        row_tab int32 [B, R, 5]: (seg min, seg max, pure, lo, hi) of each row block (see
        segment_block_bounds, visit_ranges); col_tab int32 [B, C, 3]: (seg min, seg max,
        pure) of each column block.
    """
    if rows_are_queries:
        row_ids, col_ids = q_segment_ids, kv_segment_ids
        kinds = block_kind_table(q_segment_ids, kv_segment_ids, row_block, col_block,
                                 causal=causal)
    else:
        row_ids, col_ids = kv_segment_ids, q_segment_ids
        kinds = block_kind_table(q_segment_ids, kv_segment_ids, col_block, row_block,
                                 causal=causal).transpose(0, 2, 1)
    lo, hi = visit_ranges(kinds)
    return (jnp.stack([*segment_block_bounds(row_ids, row_block), lo, hi], axis=-1),
            jnp.stack(segment_block_bounds(col_ids, col_block), axis=-1))


def visit_blocks(step, carry, *, row, n_cols, row_block, col_block, rows_are_queries, causal,
                 tables):
    """Inside a kernel: carry = step(col, carry, masked) over the column blocks row block
    `row` must see, skipping the SKIP blocks.

    `masked` is static (a Python bool): FULL blocks run a step traced without any
    elementwise select.

    Args:
        tables: (row_tab_ref, col_tab_ref, b) in segment mode (the refs hold block_tables'
            two tables, b is the program's batch row), else None.
        causal: causal masking (only consulted without tables, and by block_kind).
    """
    def run(start, stop, masked, c):
        return lax.fori_loop(start, stop, lambda col, c: step(col, c, masked), c)

    if tables is not None:
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
                                  causal=causal)
            else:
                kind = block_kind(c_first, c_last, r_first, r_last, c_seg, r_seg,
                                  causal=causal)
            # Branch order follows SKIP, FULL, MASKED = 0, 1, 2.
            return lax.switch(kind, [lambda c: c,
                                     lambda c: step(col, c, False),
                                     lambda c: step(col, c, True)], c)

        return lax.fori_loop(lo, hi, body, carry)
    if causal:
        for start, stop, masked in causal_block_ranges(
                row, row_block, col_block, n_cols, rows_are_queries=rows_are_queries):
            carry = run(start, stop, masked, carry)
        return carry
    return run(0, n_cols, False, carry)
