"""Flash-attention backward for Hopper GPUs (sm_90) in Pallas Mosaic GPU: dQ and dK/dV.

FlashAttention-2's backward (Dao, arXiv:2307.08691, Alg. 2) split into two kernels, so that
no kernel needs atomics. Both use the three-warpgroup pipeline of `flash_mgpu.py`
(two compute warpgroups of 64-row tiles, a TMA producer warpgroup, loaded / consumed
barriers per slot) and its conventions (base-2 exponents with c = sm_scale * log2(e); the
forward's natural-log LSE is rescaled to base 2 once, outside the kernels).

- dQ: one program per 2 * bwd_block_q query rows of one (batch, query head); streams K and
  V; per block S and dP = dO V^T are two wgmmas in flight, then dS = P (dP - delta) and
  dQ += dS K.
- dK/dV: one program per 2 * bwd_block_kv key rows of one (batch, kv head); streams Q, dO and
  the row statistics of all G query heads of that kv head, so GQA is reduced in registers.
  Rows are keys (the wgmma M dimension): S^T = K Q^T, dV += P^T dO with dP^T = V dO^T in
  flight, dK += dS^T Q.

Scope: that of the forward with head dim at most 128 (`unsupported_reason(backward=True)`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# The pipeline building blocks are shared with the forward (same package, one pipeline).
from instructjax.kernels.flash_mgpu import (
    _COMPUTE_REGISTERS, _COMPUTE_WARPGROUPS, _LOG2E, _PRODUCER_REGISTERS, MosaicBlocks,
    _causal_visible, _check_scale_and_causality, _kv_steps_before, _launch, _pass_over,
    _program_range, _query_tile, _segment_parts, _slot, _smem_tiles, _stream,
    _streamed_visibility, _switch_on_kind, _visit_kv_blocks, unsupported_reason)


def _issue_scores(a_smem, b_smem, shape):
    """a [M, D] x b [N, D]^T -> [M, N] float32 with one wgmma (b read through a transpose)."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _mask_weights(p, slot, streamed, own_ids, **visibility):
    """Segment mode: p [rows, cols] with the weights of invisible pairs of a MASKED block set
    to 0 (queries that see nothing have lse -inf, so their p is inf before the select);
    FULL blocks unchanged. Arguments as in _streamed_visibility."""
    visible = _streamed_visibility(p.shape, slot, streamed, own_ids, **visibility)
    return p if visible is None else jnp.where(visible, p, 0.0)


def _accumulate(acc, a, b_smem):
    """acc + a @ b with a [M, K] in registers and b [K, N] in shared memory (float32 acc)."""
    def body(acc_ref):
        acc_ref[...] = acc
        plgpu.wgmma(acc_ref, a, b_smem)
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(acc.shape, jnp.float32))


def _dq_body(*refs, causal, segments, c, sm_scale, bq, bk, num_stages, group, kv_len,
             q_tiles):
    """dQ program: 2 * bq query rows of one (batch, query head); streams K and V blocks.

    Per kv block: S = Q K^T and dP = dO V^T (two wgmmas in flight), P = exp2(c S - lse2),
    dS = P (dP - delta), dQ += dS K; finally dQ *= sm_scale.
    Refs: q / do / dq [B, T, H, D], k / v [B, S, K, D], lse (log2 units) / delta float32
    [B, H, T]. smem = (q, do [2, bq, D], lse, delta [2, bq], k, v [stages, bk, D]);
    row_loaded: four [2] barriers (q, do, lse, delta); loaded / consumed: (k, v) [stages].
    With segments (as in the forward): the tables and ids after delta, and (q ids [2, bq],
    kv ids [stages, bk]) with their loaded ([2], [stages]) and consumed ([stages]) barriers.
    """
    if segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kinds, ranges, qseg_ref,
         kvseg_ref, dq_ref, smem, row_loaded, loaded, consumed, seg_smem, seg_loaded,
         seg_consumed) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, smem, row_loaded, loaded,
         consumed) = refs
    b, h = lax.axis_index("batch"), lax.axis_index("heads")
    tile = _query_tile(causal, q_tiles)
    wg = lax.axis_index("wg")
    q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem = smem
    (k_loaded, v_loaded), (k_consumed, v_consumed) = loaded, consumed
    D, dtype = q_smem.shape[-1], q_smem.dtype
    rows_per_program = _COMPUTE_WARPGROUPS * bq
    first_block = 0
    if segments:
        first_block, program_steps = _program_range(ranges, b, tile * _COMPUTE_WARPGROUPS)
    elif causal:
        program_steps = _kv_steps_before((tile + 1) * rows_per_program, bk)
    else:
        program_steps = kv_len // bk
    kv_rows = lambda j: (b, pl.ds((first_block + j) * bk, bk), lax.div(h, jnp.int32(group)))
    streams = [(lambda j: k_ref.at[kv_rows(j)], k_smem, k_loaded, k_consumed),
               (lambda j: v_ref.at[kv_rows(j)], v_smem, v_loaded, v_consumed)]
    if segments:
        (qseg_smem, kvseg_smem), (qseg_loaded, kvseg_loaded) = seg_smem, seg_loaded
        streams.append((lambda j: kvseg_ref.at[b, pl.ds((first_block + j) * bk, bk)],
                        kvseg_smem, kvseg_loaded, seg_consumed))

    @pl.when(wg < _COMPUTE_WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
        row0 = tile * rows_per_program + wg * bq
        rows, stat_rows = (b, pl.ds(row0, bq), h), (b, h, pl.ds(row0, bq))
        copies = [(q_ref.at[rows], q_smem), (do_ref.at[rows], do_smem),
                  (lse_ref.at[stat_rows], lse_smem), (delta_ref.at[stat_rows], delta_smem)]
        for (src, dst), barrier in zip(copies, row_loaded):
            plgpu.copy_gmem_to_smem(src, dst.at[wg], barrier.at[wg])
        for barrier in row_loaded:
            plgpu.barrier_wait(barrier.at[wg])
        row_vector = plgpu.Layout.WGMMA.reduce(1)
        lse = plgpu.load(lse_smem.at[wg], (), layout=row_vector)
        delta = plgpu.load(delta_smem.at[wg], (), layout=row_vector)
        dq = plgpu.layout_cast(jnp.full((bq, D), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        steps = _kv_steps_before(row0 + bq, bk) if causal else program_steps
        if segments:
            plgpu.copy_gmem_to_smem(qseg_ref.at[b, pl.ds(row0, bq)], qseg_smem.at[wg],
                                    qseg_loaded.at[wg])
            plgpu.barrier_wait(qseg_loaded.at[wg])
            q_ids = plgpu.load(qseg_smem.at[wg], (), layout=row_vector)

        def step(j, dq, *, masked):
            slot = _slot(j, num_stages)
            col0 = (first_block + j) * bk
            plgpu.barrier_wait(k_loaded.at[slot])
            plgpu.barrier_wait(v_loaded.at[slot])

            def scores_and_dprobs(s_ref, dp_ref):
                plgpu.wgmma(s_ref, q_smem.at[wg], plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                plgpu.wgmma(dp_ref, do_smem.at[wg],
                            plgpu.transpose_ref(v_smem.at[slot], (1, 0)))
                return s_ref[...], dp_ref[...]

            s, dp = pl.run_scoped(scores_and_dprobs, plgpu.ACC((bq, bk), jnp.float32),
                                  plgpu.ACC((bq, bk), jnp.float32))
            plgpu.barrier_arrive(v_consumed.at[slot])
            p = jnp.exp2(s * c - lax.broadcast_in_dim(lse, s.shape, [0]))
            if segments:
                p = _mask_weights(p, slot, (kvseg_smem, kvseg_loaded, seg_consumed), q_ids,
                                  masked=masked, causal=causal, row0=row0, col0=col0,
                                  query_axis=0)
            elif masked:
                p = jnp.where(_causal_visible(p.shape, row0, col0, query_axis=0), p, 0.0)
            ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
            dq = _accumulate(dq, ds.astype(dtype), k_smem.at[slot])
            plgpu.barrier_arrive(k_consumed.at[slot])
            return dq

        pass_over = lambda j: _pass_over(j, num_stages, streams)
        if segments:
            def visit(j, dq):
                kind = kinds[b, tile * _COMPUTE_WARPGROUPS + wg, first_block + j]
                return _switch_on_kind(kind, lambda: pass_over(j),
                                       functools.partial(step, j), dq)

            dq = lax.fori_loop(0, program_steps, visit, dq)
        else:
            dq = _visit_kv_blocks(step, dq, causal=causal, row0=row0, bk=bk, steps=steps,
                                  program_steps=program_steps, pass_over=pass_over)

        q_smem.at[wg][...] = (dq * sm_scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WARPGROUPS)
    def _produce():
        plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
        _stream(program_steps, num_stages, streams)


def _dkv_body(*refs, causal, segments, c, sm_scale, bq, bk, num_stages, group, q_len):
    """dK/dV program: 2 * bk key rows of one (batch, kv head); streams the query blocks of
    all `group` query heads of that kv head (GQA reduced here, no atomics).

    Per query block (transposed so the key rows are the wgmma M dimension):
    S^T = K Q^T, P^T = exp2(c S^T - lse2), dV += P^T dO and dP^T = V dO^T (in flight
    together), dS^T = P^T (dP^T - delta), dK += dS^T Q; finally dK *= sm_scale.
    smem = (k, v [2, bk, D], q, do [stages, bq, D], lse, delta [stages, bq]);
    row_loaded: (k, v) [2]; loaded / consumed: (q, do, lse, delta) [stages].
    With segments: the tables (rows: kv blocks, columns: query blocks) and ids after delta,
    and (kv ids [2, bk], q ids [stages, bq]) with their loaded ([2], [stages]) and consumed
    ([stages]) barriers; a program streams, for each head, the union of its two rows'
    query-block ranges.
    """
    if segments:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, kinds, ranges, qseg_ref,
         kvseg_ref, dk_ref, dv_ref, smem, row_loaded, loaded, consumed, seg_smem, seg_loaded,
         seg_consumed) = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, smem, row_loaded,
         loaded, consumed) = refs
    b, kh = lax.axis_index("batch"), lax.axis_index("kv_heads")
    tile, wg = lax.axis_index("kv_tiles"), lax.axis_index("wg")
    k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem = smem
    q_loaded, do_loaded, lse_loaded, delta_loaded = loaded
    q_consumed, do_consumed, lse_consumed, delta_consumed = consumed
    D, dtype = k_smem.shape[-1], k_smem.dtype
    rows_per_program = _COMPUTE_WARPGROUPS * bk
    n_q = q_len // bq
    if segments:
        q_begin, per_head = _program_range(ranges, b, tile * _COMPUTE_WARPGROUPS)
    else:
        # Causal: query blocks that end before the program's first key see none of its keys.
        q_begin = lax.div(tile * rows_per_program, jnp.int32(bq)) if causal else 0
        per_head = n_q - q_begin
    program_steps = group * per_head
    divisor = jnp.maximum(per_head, 1)      # per_head = 0 streams nothing

    def head_and_block(j):
        return kh * group + lax.div(j, divisor), q_begin + lax.rem(j, divisor)

    def q_rows(j):
        h, i = head_and_block(j)
        return b, pl.ds(i * bq, bq), h

    def stat_rows(j):
        h, i = head_and_block(j)
        return b, h, pl.ds(i * bq, bq)

    streams = [(lambda j: q_ref.at[q_rows(j)], q_smem, q_loaded, q_consumed),
               (lambda j: do_ref.at[q_rows(j)], do_smem, do_loaded, do_consumed),
               (lambda j: lse_ref.at[stat_rows(j)], lse_smem, lse_loaded, lse_consumed),
               (lambda j: delta_ref.at[stat_rows(j)], delta_smem, delta_loaded, delta_consumed)]
    if segments:
        (kvseg_smem, qseg_smem), (kvseg_loaded, qseg_loaded) = seg_smem, seg_loaded
        streams.append((lambda j: qseg_ref.at[b, pl.ds(head_and_block(j)[1] * bq, bq)],
                        qseg_smem, qseg_loaded, seg_consumed))

    @pl.when(wg < _COMPUTE_WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
        k0 = tile * rows_per_program + wg * bk
        rows = (b, pl.ds(k0, bk), kh)
        for src, dst, barrier in zip((k_ref, v_ref), (k_smem, v_smem), row_loaded):
            plgpu.copy_gmem_to_smem(src.at[rows], dst.at[wg], barrier.at[wg])
        for barrier in row_loaded:
            plgpu.barrier_wait(barrier.at[wg])
        zeros = lambda: plgpu.layout_cast(jnp.full((bk, D), 0.0, jnp.float32),
                                          plgpu.Layout.WGMMA)
        col_vector = plgpu.Layout.WGMMA.reduce(0)
        if segments:
            plgpu.copy_gmem_to_smem(kvseg_ref.at[b, pl.ds(k0, bk)], kvseg_smem.at[wg],
                                    kvseg_loaded.at[wg])
            plgpu.barrier_wait(kvseg_loaded.at[wg])
            kv_ids = plgpu.load(kvseg_smem.at[wg], (), layout=plgpu.Layout.WGMMA.reduce(1))

        def step(i, carry, *, base, masked, q_offset=0):
            # Stream step base + i holds query block q_offset + i.
            dk, dv = carry
            slot = _slot(base + i, num_stages)
            q0 = (q_offset + i) * bq
            plgpu.barrier_wait(q_loaded.at[slot])
            plgpu.barrier_wait(lse_loaded.at[slot])
            s_t = _issue_scores(k_smem.at[wg], q_smem.at[slot], (bk, bq))
            lse = plgpu.load(lse_smem.at[slot], (), layout=col_vector)
            plgpu.barrier_arrive(lse_consumed.at[slot])
            p_t = jnp.exp2(s_t * c - lax.broadcast_in_dim(lse, s_t.shape, [1]))
            if segments:
                p_t = _mask_weights(p_t, slot, (qseg_smem, qseg_loaded, seg_consumed), kv_ids,
                                    masked=masked, causal=causal, row0=k0, col0=q0,
                                    query_axis=1)
            elif masked:
                p_t = jnp.where(_causal_visible(p_t.shape, k0, q0, query_axis=1), p_t, 0.0)
            plgpu.barrier_wait(do_loaded.at[slot])

            def dv_and_dprobs(dv_ref, dp_ref):
                dv_ref[...] = dv
                plgpu.wgmma(dv_ref, p_t.astype(dtype), do_smem.at[slot])
                plgpu.wgmma(dp_ref, v_smem.at[wg], plgpu.transpose_ref(do_smem.at[slot], (1, 0)))
                return dv_ref[...], dp_ref[...]

            dv, dp_t = pl.run_scoped(dv_and_dprobs, plgpu.ACC((bk, D), jnp.float32),
                                     plgpu.ACC((bk, bq), jnp.float32))
            plgpu.barrier_arrive(do_consumed.at[slot])
            plgpu.barrier_wait(delta_loaded.at[slot])
            delta = plgpu.load(delta_smem.at[slot], (), layout=col_vector)
            plgpu.barrier_arrive(delta_consumed.at[slot])
            ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))
            dk = _accumulate(dk, ds_t.astype(dtype), q_smem.at[slot])
            plgpu.barrier_arrive(q_consumed.at[slot])
            return dk, dv

        def head(g, carry):
            if segments:
                def visit(i, carry):
                    kind = kinds[b, tile * _COMPUTE_WARPGROUPS + wg, q_begin + i]
                    return _switch_on_kind(
                        kind, lambda: _pass_over(g * per_head + i, num_stages, streams),
                        functools.partial(step, i, base=g * per_head, q_offset=q_begin),
                        carry)

                return lax.fori_loop(0, per_head, visit, carry)
            base = g * per_head - q_begin           # stream step of query block i: base + i
            if causal:
                # The program's stream starts at the first warpgroup's keys; blocks that end
                # before this warpgroup's first key see none of its keys: only release them.
                first_seen = jnp.maximum(q_begin, lax.div(k0, jnp.int32(bq)))

                @pl.loop(q_begin, first_seen)
                def _(i):
                    _pass_over(base + i, num_stages, streams)

                # Blocks whose first query is at or after the last key need no mask.
                first_full = jnp.clip(lax.div(k0 + bk - 1 + bq - 1, jnp.int32(bq)),
                                      first_seen, n_q)
                carry = lax.fori_loop(first_seen, first_full,
                                      functools.partial(step, base=base, masked=True), carry)
                return lax.fori_loop(first_full, n_q,
                                     functools.partial(step, base=base, masked=False), carry)
            return lax.fori_loop(0, n_q, functools.partial(step, base=base, masked=False),
                                 carry)

        dk, dv = lax.fori_loop(0, group, head, (zeros(), zeros()))
        k_smem.at[wg][...] = (dk * sm_scale).astype(dtype)
        v_smem.at[wg][...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[rows])
        plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WARPGROUPS)
    def _produce():
        plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
        _stream(program_steps, num_stages, streams)


def flash_backward(q, k, v, do, lse, delta, *, causal, sm_scale, blocks: MosaicBlocks,
                   q_seg=None, kv_seg=None, interpret=None):
    """Hopper flash-attention backward on padded arrays: (dq, dk, dv).

    Args:
        q, do: [B, T, H, D] bfloat16 / float16, T a multiple of blocks.q_multiple.
        k, v: [B, S, K, D] same dtype, S a multiple of blocks.kv_multiple.
        lse: float32 [B, H, T] natural log-sum-exp of the scaled scores (the forward's).
        delta: float32 [B, H, T] rowsum(o * do) (minus any LSE cotangent).
        causal, sm_scale, blocks, q_seg, kv_seg, interpret: as in flash_forward (with
            segments, queries that see nothing have lse -inf and get zero gradients).

    Returns:
        dq like q, dk like k, dv like v.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    segments = q_seg is not None
    if segments != (kv_seg is not None):
        raise ValueError("pass both q_seg and kv_seg, or neither")
    reason = unsupported_reason(q.dtype, D, backward=True)
    if reason is not None:
        raise ValueError(f"the Hopper flash-attention kernel does not support {reason}")
    bq, bk, stages = blocks.bwd_block_q, blocks.bwd_block_kv, blocks.num_stages
    _check_scale_and_causality(sm_scale, causal, T, S)
    if T % blocks.q_multiple or S % blocks.kv_multiple:
        raise ValueError(f"lengths T={T}, S={S} must be multiples of {blocks.q_multiple} "
                         f"and {blocks.kv_multiple} (pad them)")
    c = float(sm_scale) * _LOG2E
    lse2 = lse * _LOG2E                  # the kernels exponentiate in base 2
    delta = delta.astype(jnp.float32)
    tiles = lambda *shape: _smem_tiles(shape, q.dtype)
    vectors = lambda *shape: plgpu.SMEM(shape, jnp.float32)
    two = _COMPUTE_WARPGROUPS


    def segment_parts(row_block, col_block, n_stages, rows_are_queries):
        if not segments:
            return (), ()
        return _segment_parts(q_seg, kv_seg, row_block, col_block, n_stages, causal=causal,
                              rows_are_queries=rows_are_queries)

    dq_stages = min(stages, S // bk)
    dq_body = functools.partial(_dq_body, causal=causal, segments=segments, c=c,
                                sm_scale=float(sm_scale), bq=bq, bk=bk, num_stages=dq_stages,
                                group=H // K, kv_len=S, q_tiles=T // (two * bq))
    dq_scratch = (
        (tiles(two, bq, D), tiles(two, bq, D), vectors(two, bq), vectors(two, bq),
         tiles(dq_stages, bk, D), tiles(dq_stages, bk, D)),
        (plgpu.Barrier(num_barriers=two),) * 4,
        (plgpu.Barrier(num_barriers=dq_stages),) * 2,
        (plgpu.Barrier(num_arrivals=two, num_barriers=dq_stages),) * 2,
    )
    extra_in, extra_scratch = segment_parts(bq, bk, dq_stages, True)
    dq = _launch("flash_attention_dq_hopper", dq_body, dq_scratch + extra_scratch,
                 (q, k, v, do, lse2, delta) + extra_in,
                 out_type=jax.ShapeDtypeStruct(q.shape, q.dtype), grid=(H, T // (two * bq), B),
                 grid_names=("heads", "q_tiles", "batch"), interpret=interpret)

    dkv_stages = min(stages, H // K * (T // bq))     # more slots than steps would idle
    dkv_body = functools.partial(_dkv_body, causal=causal, segments=segments, c=c,
                                 sm_scale=float(sm_scale), bq=bq, bk=bk,
                                 num_stages=dkv_stages, group=H // K, q_len=T)
    dkv_scratch = (
        (tiles(two, bk, D), tiles(two, bk, D), tiles(dkv_stages, bq, D),
         tiles(dkv_stages, bq, D), vectors(dkv_stages, bq), vectors(dkv_stages, bq)),
        (plgpu.Barrier(num_barriers=two),) * 2,
        (plgpu.Barrier(num_barriers=dkv_stages),) * 4,
        (plgpu.Barrier(num_arrivals=two, num_barriers=dkv_stages),) * 4,
    )

    extra_in, extra_scratch = segment_parts(bk, bq, dkv_stages, False)
    dk, dv = _launch(
        "flash_attention_dkv_hopper", dkv_body, dkv_scratch + extra_scratch,
        (q, k, v, do, lse2, delta) + extra_in,
        out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(K, S // (two * bk), B), grid_names=("kv_heads", "kv_tiles", "batch"),
        interpret=interpret)
    return dq, dk, dv
