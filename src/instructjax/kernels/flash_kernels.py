"""The Pallas kernel bodies of flash.py: forward, dQ and dK/dV programs.

Written in the array-per-program style that Triton lowers, Mosaic TPU lowers and the Pallas
interpreter runs (one formulation, three backends); flash.py builds their
pallas_calls (grids, block specs, block-skipping tables), the custom VJP and the wrapper.
Semantics, algorithm and letters as described there. `cfg` is flash_attention's `_Config`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from instructjax.kernels import block_sparsity as bsp

# Score fill for masked entries. Finite (not -inf) so that a row whose entries are all masked
# so far has max == fill and exp(fill - fill) stays finite; those entries are then zeroed
# explicitly. 0.7 * max leaves room to subtract any real score without overflow.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


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


def _group_rows(cfg, ref, g, start, size):
    """Rows [start, start + size) of head g of a group block ref -> [size, D]."""
    if cfg.heads_major:
        return ref[g, pl.ds(start, size), :]
    return ref[pl.ds(start, size), g, :]


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


# ------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------

def fwd_kernel(*refs, cfg, n_kv):
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
    m, l, acc = bsp.visit_blocks(step, carry, row=i, n_cols=n_kv, row_block=bq, col_block=bk,
                                 rows_are_queries=True, causal=cfg.causal, tables=tables)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def dq_kernel(*refs, cfg, n_kv):
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
    dq = bsp.visit_blocks(step, jnp.zeros(q.shape, jnp.float32), row=i, n_cols=n_kv,
                          row_block=bq, col_block=bk, rows_are_queries=True, causal=cfg.causal,
                          tables=tables)
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def dkdv_kernel(*refs, cfg, n_q, G):
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

        return bsp.visit_blocks(step, carry, row=j, n_cols=n_q, row_block=bk, col_block=bq,
                                rows_are_queries=False, causal=cfg.causal, tables=tables)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, G, head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
