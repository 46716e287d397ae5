"""Flash attention for Hopper GPUs (sm_90) in Pallas Mosaic GPU: the tiles, the warpgroup
pipeline all kernels share, and the forward (dQ and dK/dV: flash_mgpu_bwd.py).

The Triton kernels of `flash.py` leave the pipelining to Triton. On Hopper the fast
formulation (FlashAttention-3, Shah et al., arXiv:2407.08608) needs what Triton does not
expose and Mosaic GPU does: wgmma reading shared memory, TMA copies, warp specialisation.

Every kernel runs three warpgroups per program (CTA): two compute warpgroups owning 64-row
tiles, and a producer (`_stream`) TMA-copying the blocks they walk over through `num_stages`
shared-memory slots, refilling a slot once both are done with it ("consumed" barriers).

- forward: one program per 2 * block_q query rows of one (batch, query head); streams K and V.
  S = Q K^T is a wgmma from shared memory, P (registers) V a wgmma with a register operand.
  "Ping-pong": a two-arrival barrier alternates the compute warpgroups, so one runs its
  softmax while the other's matmul holds the tensor cores.
- dQ and dK/dV (flash_mgpu_bwd.py): programs over query rows and over key rows;
  dK/dV streams all G query heads of its kv head, so GQA is reduced without atomics.

Numerics: exponents are base 2: with c = sm_scale * log2(e), the running max m is in units
of c * score and p = exp2(c * s - m), one FMA per exponent. The LSE written is the natural
log of the scaled scores (what the Triton and interpreter kernels save, so forward and
backward of either family mix); the backward rescales it to base 2 outside the kernels.

Scope (the wrapper in flash.py falls back to Triton outside it): bf16 or f16,
head dim a multiple of 64 up to 256 (backward: up to 128, shared memory); the query length
a multiple of MosaicBlocks.q_multiple and the key length of kv_multiple (the wrapper pads;
under causal masking padded keys follow every real query, so they need no mask; otherwise
they get segment id 0). Causal programs visit only blocks on their side of the diagonal,
masking only those crossing it; every causal row sees key 0 first, so no 0/0 arises.

Segment ids (packed documents, the wrapper's padded keys): `segment_tables` holds the kind
(SKIP / FULL / MASKED, block_sparsity.block_kind_table) of every (row block, column block)
and each row block's [lo, hi) of non-SKIP columns (rows: 64 query rows; dK/dV: key rows). A program streams the union of its two rows' ranges,
with the column blocks' ids as one more TMA stream; each compute warpgroup reads one kind
per block, passes over SKIP blocks (those outside its own range included, keeping the
forward's ping-pong count), runs FULL blocks unmasked and masks MASKED ones with the ids.
A row may then see nothing (padding): the forward masks scores with a finite value and
selects the weights to 0, so it gives 0 and an LSE of -inf, as the Triton kernels do; the
backward's selects turn exp2(s - (-inf)) = inf into 0 gradients.

Letters: B batch, T / S query / key length, H query heads, K kv heads, G = H // K, D head
dim; bq / bk query / kv block sizes.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from instructjax.kernels import block_sparsity as bsp

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_COMPUTE_WARPGROUPS = 2
# Finite score fill where a row may see nothing (segments): see the Triton formulation.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
# setmaxnreg: a 3-warpgroup CTA launches with 168 registers per thread (64,512 in all); the
# producer gives back down to 40, and 2 * 232 + 40 = 504 is the most the compute warpgroups
# can then take (an increase beyond the freed pool blocks forever).
_COMPUTE_REGISTERS, _PRODUCER_REGISTERS = 232, 40


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """Tiles of the Hopper forward.

    block_q: forward query rows per compute warpgroup (a program owns 2 * block_q rows);
        a multiple of 64, the wgmma M tile of one warpgroup.
    block_kv: forward keys per pipeline step; a multiple of 64.
    num_stages: shared-memory slots of the streamed blocks (>= 2 to overlap TMA with compute).
    bwd_block_q: dQ rows per compute warpgroup and queries per dK/dV step.
    bwd_block_kv: dK/dV rows per compute warpgroup and keys per dQ step.
    Forward shared memory: 2*bq*D (Q, reused for O) + 2*num_stages*bk*D elements, at D = 128
    in bf16 with 64 / 128 / 2 that is 160 KiB of the H100/H200's 227 KiB. Backward at D = 128
    with 64 / 64: dQ 128 KiB, dK/dV 128 KiB (+ the float32 row statistics). Lowering checks
    the shared-memory budget; registers it does not: a compute warpgroup has 232 per thread,
    and a [rows, cols] float32 tile costs rows * cols / 128 of them. The backward's dK and dV
    accumulators ([bwd_block_kv, D] each) plus two [bwd_block_kv, bwd_block_q] score tiles
    fit at 64 / 64 up to D = 128; larger backward blocks are for D = 64 and will spill
    beyond it.
    """
    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2
    bwd_block_q: int = 64
    bwd_block_kv: int = 64

    def __post_init__(self):
        for name in ("block_q", "block_kv", "bwd_block_q", "bwd_block_kv"):
            if getattr(self, name) % 64:
                raise ValueError(f"{name} ({getattr(self, name)}) must be a multiple of 64 "
                                 "for the Hopper kernels")
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be at least 2, got {self.num_stages}")

    @classmethod
    def default(cls, head_dim: int) -> "MosaicBlocks":
        """Largest kv block whose two stages fit shared memory: 256 / 128 / 64 keys up to
        D = 64 / 128 / 256 (144 / 160 / 192 KiB in bf16)."""
        return cls(block_kv=256 if head_dim <= 64 else 128 if head_dim <= 128 else 64)

    @property
    def rows_per_program(self) -> int:
        """Query rows of one forward program."""
        return _COMPUTE_WARPGROUPS * self.block_q

    @property
    def q_multiple(self) -> int:
        """What the query length must be a multiple of for the forward and backward."""
        return math.lcm(self.rows_per_program, _COMPUTE_WARPGROUPS * self.bwd_block_q)

    @property
    def kv_multiple(self) -> int:
        """What the key length must be a multiple of for the forward and backward."""
        return math.lcm(self.block_kv, _COMPUTE_WARPGROUPS * self.bwd_block_kv)


def unsupported_reason(dtype, head_dim: int, *, backward: bool = False) -> str | None:
    """Why the Hopper forward (or with backward=True, the backward) cannot run a call
    (None when it can)."""
    if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype).name} (needs bfloat16 or float16)"
    if head_dim % 64 or head_dim > 256:
        return f"head dim {head_dim} (needs a multiple of 64 up to 256)"
    if backward and head_dim > 128:
        # Two 64-row Q/dO (or K/V) tiles plus two stages of the streamed pair: 256 KiB at
        # D = 256, over the 227 KiB of shared memory.
        return f"head dim {head_dim} in the backward (needs at most 128)"
    return None


def _check_scale_and_causality(sm_scale, causal, T, S):
    if not sm_scale > 0:
        # Masking sets scores to -inf before the (positive) scale: a negative scale would
        # turn them into +inf.
        raise ValueError(f"the Hopper kernels need sm_scale > 0, got {sm_scale}")
    if causal and T != S:
        raise ValueError(f"causal attention needs T == S, got {T}, {S}")


def is_hopper(device) -> bool:
    """Whether a jax device is an sm_90 GPU (wgmma and setmaxnreg exist only there)."""
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")) == "9.0"


def kernels_to_use(gpu_forward, gpu_backward, blocks, *, dtype, head_dim, sm_scale, available):
    """Which directions the Hopper kernels run, and their tiles.

    gpu_forward / gpu_backward: "triton" or "mosaic" (BlockSizes' choice); blocks:
    MosaicBlocks or None (default by head dim); available: a Hopper GPU or its interpreter
    is the target. Returns (tiles or None, forward, backward); a direction asked for runs
    only where `unsupported_reason` allows it and sm_scale > 0.
    """
    def usable(asked, backward):
        return (asked == "mosaic" and available and sm_scale > 0
                and unsupported_reason(dtype, head_dim, backward=backward) is None)

    forward, backward = usable(gpu_forward, False), usable(gpu_backward, True)
    if not (forward or backward):
        return None, False, False
    return blocks or MosaicBlocks.default(head_dim), forward, backward


def _kv_steps_before(row_end, bk):
    """Number of kv blocks a causal row range ending (exclusively) at row_end touches."""
    return lax.div(row_end + (bk - 1), jnp.int32(bk))


def _query_tile(causal, num_tiles):
    """This program's query tile. Under causal masking later tiles have more work: they are
    numbered first so that they tend to start first and the short ones fill the tail (blocks
    launch roughly in grid order with the first axis, heads, fastest)."""
    tile = lax.axis_index("q_tiles")
    return (num_tiles - 1) - tile if causal else tile


def _slot(j, num_stages):
    return lax.rem(j, jnp.int32(num_stages))


def _stream(steps, num_stages, streams):
    """Producer warpgroup: TMA-copy steps [0, steps) of each stream through the slots.

    streams: (source, smem, loaded, consumed) with source(j) the HBM view of step j, smem
    [num_stages, ...] and the loaded / consumed barriers [num_stages]. Step j uses slot
    j % num_stages; a slot is refilled once its consumed barrier (one arrival per compute
    warpgroup) completes. At the end the producer also waits for the releases of the last
    steps: a barrier's phase parity is tracked per waiting thread, so a thread that waits on
    a barrier must not skip any of its phases (this wait costs nothing: the compute
    warpgroups are the last to finish anyway).
    """
    def load(j, slot):
        for source, smem, loaded, _ in streams:
            plgpu.copy_gmem_to_smem(source(j), smem.at[slot], loaded.at[slot])

    for slot in range(num_stages):
        pl.when(slot < steps)(functools.partial(load, slot, slot))

    @pl.loop(num_stages, steps)
    def _(j):
        slot = _slot(j, num_stages)
        for source, smem, loaded, consumed in streams:
            plgpu.barrier_wait(consumed.at[slot])
            plgpu.copy_gmem_to_smem(source(j), smem.at[slot], loaded.at[slot])

    @pl.loop(jnp.maximum(steps - num_stages, 0), steps)
    def _(j):
        for _, _, _, consumed in streams:
            plgpu.barrier_wait(consumed.at[_slot(j, num_stages)])


def _pass_over(j, num_stages, streams):
    """Compute warpgroup, step j it does not need: observe the loads, release the slot."""
    slot = _slot(j, num_stages)
    for _, _, loaded, consumed in streams:
        plgpu.barrier_wait(loaded.at[slot])
        plgpu.barrier_arrive(consumed.at[slot])


def _causal_visible(shape, row0, col0, *, query_axis):
    """bool [shape] in the wgmma register layout: query position >= key position, for a
    tile whose rows start at row0 and columns at col0; `query_axis` (0 or 1) says which
    axis indexes queries."""
    rows = row0 + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
    cols = col0 + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
    return rows >= cols if query_axis == 0 else cols >= rows


def _visit_kv_blocks(step, carry, *, causal, row0, bk, steps, program_steps, pass_over):
    """Compute warpgroup of a query-row program (forward, dQ): run step(j, carry, masked=)
    over its kv blocks [0, steps).

    Causal: blocks entirely left of the diagonal need no mask, the rest cross it; then
    pass_over(j) for the blocks [steps, program_steps) that only the other warpgroup needs.
    """
    if not causal:
        return lax.fori_loop(0, steps, functools.partial(step, masked=False), carry)
    unmasked = lax.div(row0, jnp.int32(bk))
    carry = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(unmasked, steps, functools.partial(step, masked=True), carry)
    pl.loop(steps, program_steps)(pass_over)
    return carry


def segment_tables(q_seg, kv_seg, row_block, col_block, *, causal, rows_are_queries):
    """The two int32 tables of segment mode: kinds [B, R, C] (SKIP / FULL / MASKED of every
    (row block, column block) pair, block_sparsity.block_kind_table, transposed when rows
    are key blocks) and ranges [B, R, 2] ([lo, hi) of each row's non-SKIP columns). A
    kernel step then reads one scalar (its block's kind) instead of recomputing it."""
    if rows_are_queries:
        kinds = bsp.block_kind_table(q_seg, kv_seg, row_block, col_block, causal=causal)
    else:
        kinds = bsp.block_kind_table(q_seg, kv_seg, col_block, row_block,
                                     causal=causal).transpose(0, 2, 1)
    return kinds, jnp.stack(bsp.visit_ranges(kinds), axis=-1)


def _segment_parts(q_seg, kv_seg, row_block, col_block, n_stages, *, causal,
                   rows_are_queries):
    """A kernel's extra inputs and scratch in segment mode.

    Inputs: the segment_tables and both id arrays (int32). Scratch: (row ids [2, row_block],
    streamed column ids [n_stages, col_block]), their loaded barriers ([2], [n_stages]) and
    the column ids' consumed barriers ([n_stages], one arrival per compute warpgroup).
    """
    q_seg, kv_seg = q_seg.astype(jnp.int32), kv_seg.astype(jnp.int32)
    tables = segment_tables(q_seg, kv_seg, row_block, col_block, causal=causal,
                            rows_are_queries=rows_are_queries)
    two = _COMPUTE_WARPGROUPS
    scratch = ((plgpu.SMEM((two, row_block), jnp.int32),
                plgpu.SMEM((n_stages, col_block), jnp.int32)),
               (plgpu.Barrier(num_barriers=two), plgpu.Barrier(num_barriers=n_stages)),
               plgpu.Barrier(num_arrivals=two, num_barriers=n_stages))
    return (*tables, q_seg, kv_seg), scratch


def _program_range(ranges, b, first_row):
    """Segment mode: the column blocks [first, first + steps) a program of the compute
    warpgroups' row blocks first_row, first_row + 1 streams (the union of their [lo, hi)
    ranges)."""
    lo0, hi0 = ranges[b, first_row, 0], ranges[b, first_row, 1]
    lo1, hi1 = ranges[b, first_row + 1, 0], ranges[b, first_row + 1, 1]
    empty0, empty1 = hi0 <= lo0, hi1 <= lo1
    first = jnp.where(empty0, lo1, jnp.where(empty1, lo0, jnp.minimum(lo0, lo1)))
    last = jnp.where(empty0, hi1, jnp.where(empty1, hi0, jnp.maximum(hi0, hi1)))
    return first, jnp.maximum(last - first, 0)


def _switch_on_kind(kind, pass_over, step, carry):
    """carry after pass_over() (SKIP), step(carry, masked=False) (FULL) or masked=True."""
    return lax.switch(kind, [lambda c: (pass_over(), c)[1],
                             functools.partial(step, masked=False),
                             functools.partial(step, masked=True)], carry)


def _segment_visible(shape, row_ids, col_ids, *, query_axis):
    """bool [shape] in the wgmma layout: same non-zero segment; row_ids [rows] in the
    WGMMA.reduce(1) layout, col_ids [cols] in WGMMA.reduce(0); query_axis says which axis
    indexes queries (padding is a query id of 0)."""
    r = lax.broadcast_in_dim(row_ids, shape, [0])
    c = lax.broadcast_in_dim(col_ids, shape, [1])
    return (r == c) & ((r if query_axis == 0 else c) != 0)


def _streamed_visibility(shape, slot, streamed, own_ids, *, masked, causal, row0, col0,
                         query_axis):
    """Segment mode, one streamed column block: wait for its ids and release their slot;
    for a MASKED block return bool [shape] (same non-zero segment, and the diagonal when
    causal), for a FULL one None.

    streamed: (ids smem [stages, cols], loaded, consumed barriers); own_ids: the rows' ids
    [rows] in the WGMMA.reduce(1) layout; row0 / col0: first row / column position;
    query_axis: which axis of `shape` indexes queries."""
    ids_smem, loaded, consumed = streamed
    plgpu.barrier_wait(loaded.at[slot])
    visible = None
    if masked:
        col_ids = plgpu.load(ids_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
        visible = _segment_visible(shape, own_ids, col_ids, query_axis=query_axis)
        if causal:
            visible = visible & _causal_visible(shape, row0, col0, query_axis=query_axis)
    plgpu.barrier_arrive(consumed.at[slot])
    return visible


def _smem_tiles(shape, dtype):
    """Shared memory for a wgmma operand: (8, 64) tiles with a 128-byte swizzle, the layout
    wgmma reads 2-byte operands from."""
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)),
                                                plgpu.SwizzleTransform(128)))


def _launch(name, body, scratch, args, *, out_type, grid, grid_names, interpret,
            compute_warpgroups=_COMPUTE_WARPGROUPS):
    """Run body(*in_refs, *out_refs, *scratch_refs) as a kernel named `name` (the name
    shows in profiles and jaxprs) of compute_warpgroups + 1 (the producer) warpgroups;
    interpret: None or InterpretGPUParams."""
    def entry(*refs):
        pl.run_scoped(lambda *scoped: body(*refs, *scoped), *scratch, collective_axes="wg")

    entry.__name__ = name
    return plgpu.kernel(
        entry, out_type=out_type, grid=grid, grid_names=grid_names,
        num_threads=compute_warpgroups + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({} if interpret is None else {"interpret": interpret}))(*args)


def _forward_body(*refs, causal, segments, c, bq, bk, num_stages, group, kv_len, q_tiles):
    """Kernel body of one program; `wg` (0, 1: compute, 2: producer) picks the role.

    Refs: q / o [B, T, H, D], k / v [B, S, K, D] in HBM, lse float32 [B, H, T] in HBM;
    smem = (qo [2, bq, D], k [stages, bk, D], v [stages, bk, D], lse [2, bq]);
    loaded = (k [stages], v [stages], q [2]) TMA barriers; consumed = (k, v) [stages] barriers
    with one arrival per compute warpgroup; pingpong: one two-arrival barrier.
    With segments, after v: kinds int32 [B, T // bq, S // bk] and ranges int32
    [B, T // bq, 2] (segment_tables), q_seg int32 [B, T], kv_seg int32 [B, S]; and seg_smem =
    (q ids [2, bq], kv ids [stages, bk]), seg_loaded = (q ids [2], kv ids [stages]),
    seg_consumed = kv ids [stages].
    """
    if segments:
        (q_ref, k_ref, v_ref, kinds, ranges, qseg_ref, kvseg_ref, o_ref, lse_ref, smem,
         loaded, consumed, pingpong, seg_smem, seg_loaded, seg_consumed) = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, smem, loaded, consumed, pingpong = refs
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    tile = _query_tile(causal, q_tiles)
    wg = lax.axis_index("wg")
    qo_smem, k_smem, v_smem, lse_smem = smem
    k_loaded, v_loaded, q_loaded = loaded
    k_consumed, v_consumed = consumed
    D = qo_smem.shape[-1]
    dtype = qo_smem.dtype

    first_block = 0
    if segments:
        # The program visits the union of its two row blocks' [lo, hi) ranges; each compute
        # warpgroup passes over the blocks outside its own range or of kind SKIP.
        first_block, program_steps = _program_range(ranges, b, tile * _COMPUTE_WARPGROUPS)
    elif causal:
        program_steps = _kv_steps_before((tile + 1) * (_COMPUTE_WARPGROUPS * bq), bk)
    else:
        program_steps = kv_len // bk
    kv_rows = lambda j: (b, pl.ds((first_block + j) * bk, bk), lax.div(h, jnp.int32(group)))
    streams = [(lambda j: k_ref.at[kv_rows(j)], k_smem, k_loaded, k_consumed),
               (lambda j: v_ref.at[kv_rows(j)], v_smem, v_loaded, v_consumed)]
    if segments:
        qseg_smem, kvseg_smem = seg_smem
        qseg_loaded, kvseg_loaded = seg_loaded
        streams.append((lambda j: kvseg_ref.at[b, pl.ds((first_block + j) * bk, bk)],
                        kvseg_smem, kvseg_loaded, seg_consumed))

    def pingpong_sync():
        plgpu.barrier_arrive(pingpong)
        plgpu.barrier_wait(pingpong)

    @pl.when(wg < _COMPUTE_WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
        q_smem = qo_smem.at[wg]
        row0 = tile * (_COMPUTE_WARPGROUPS * bq) + wg * bq
        steps = _kv_steps_before(row0 + bq, bk) if causal else program_steps

        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], q_smem, q_loaded.at[wg])
        plgpu.barrier_wait(q_loaded.at[wg])

        rows = plgpu.Layout.WGMMA.reduce(1)
        # Segments: a row may see nothing (padding, id 0), so scores are masked with a
        # finite value and the weights selected to 0 (no -inf - -inf).
        m0 = _MASK_VALUE if segments else -jnp.inf
        m = plgpu.layout_cast(jnp.full((bq,), m0, jnp.float32), rows)
        l = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), rows)
        acc = plgpu.layout_cast(jnp.full((bq, D), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        if segments:
            plgpu.copy_gmem_to_smem(qseg_ref.at[b, pl.ds(row0, bq)], qseg_smem.at[wg],
                                    qseg_loaded.at[wg])
            plgpu.barrier_wait(qseg_loaded.at[wg])
            q_ids = plgpu.load(qseg_smem.at[wg], (), layout=rows)
            row_block = tile * _COMPUTE_WARPGROUPS + wg
        else:
            # Without segments the next K is awaited early, while the P V matmul runs; with
            # them a block may be passed over, whose step waits for its own loads.
            @pl.when(steps > 0)
            def _():
                plgpu.barrier_wait(k_loaded.at[0])

        # Warpgroup 1 starts half a step behind warpgroup 0: the ping-pong offset.
        pl.when(wg == 1)(pingpong_sync)

        def step(j, carry, *, masked):
            acc, m, l = carry
            slot = lax.rem(j, jnp.int32(num_stages))
            col0 = (first_block + j) * bk
            if segments:
                plgpu.barrier_wait(k_loaded.at[slot])

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                pingpong_sync()
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((bq, bk), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])
            visible = None
            if segments:
                visible = _streamed_visibility(
                    s.shape, slot, (kvseg_smem, kvseg_loaded, seg_consumed), q_ids,
                    masked=masked, causal=causal, row0=row0, col0=col0, query_axis=0)
            elif masked:
                s = jnp.where(_causal_visible(s.shape, row0, col0, query_axis=0), s, -jnp.inf)

            if visible is not None:
                t = jnp.where(visible, s * c, _MASK_VALUE)
                m_new = jnp.maximum(m, t.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                # A masked entry's exp2(_MASK_VALUE - m_new) is 0 once its row has seen a key
                # (m_new > _MASK_VALUE); before that every entry is masked and the row's
                # weights are selected to 0. Selecting by row frees the [bq, bk] mask early.
                seen = lax.broadcast_in_dim(m_new > _MASK_VALUE, s.shape, [0])
                p = jnp.where(seen, jnp.exp2(t - lax.broadcast_in_dim(m_new, s.shape, [0])),
                              0.0)
            else:
                m_new = jnp.maximum(m, s.max(axis=1) * c)
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l = l * alpha + p.sum(axis=1)
            p_in = p.astype(dtype)
            # Keep the row statistics ahead of the barriers so the compiler cannot sink
            # them into the other warpgroup's matmul window.
            acc, l, m_new, p_in = lax.optimization_barrier((acc, l, m_new, p_in))
            plgpu.barrier_arrive(pingpong)          # softmax done
            plgpu.barrier_wait(v_loaded.at[slot])
            plgpu.barrier_wait(pingpong)            # tensor cores free again

            def values(acc_ref):
                acc_ref[...] = acc
                plgpu.wgmma(acc_ref, p_in, v_smem.at[slot])
                nxt = j + 1

                if not segments:
                    # Wait for the next K while this matmul runs.
                    @pl.when(nxt < steps)
                    def _():
                        plgpu.barrier_wait(k_loaded.at[lax.rem(nxt, jnp.int32(num_stages))])

                return acc_ref[...]

            acc = pl.run_scoped(values, plgpu.ACC((bq, D), jnp.float32))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l

        def pass_over(j):
            # Keep the ping-pong arrivals equal (two syncs per step, as in `step`), then
            # release the block (see `_stream`). Syncing first lets the other warpgroup run
            # step j - 1's P V without waiting for block j.
            pingpong_sync()
            pingpong_sync()
            _pass_over(j, num_stages, streams)

        if segments:
            def visit(j, carry):
                # Blocks outside this warpgroup's own [lo, hi) are SKIP by construction.
                kind = kinds[b, row_block, first_block + j]
                return _switch_on_kind(kind, lambda: pass_over(j),
                                       functools.partial(step, j), carry)

            acc, m, l = lax.fori_loop(0, program_steps, visit, (acc, m, l))
        else:
            acc, m, l = _visit_kv_blocks(step, (acc, m, l), causal=causal, row0=row0, bk=bk,
                                         steps=steps, program_steps=program_steps,
                                         pass_over=pass_over)
        pl.when(wg == 0)(pingpong_sync)

        if segments:
            seen = l > 0.0
            l = jnp.where(seen, l, 1.0)
            lse = jnp.where(seen, (m + jnp.log2(l)) * _LN2, -jnp.inf)
        else:
            lse = (m + jnp.log2(l)) * _LN2
        acc = acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0])
        q_smem[...] = acc.astype(dtype)              # queries are no longer needed
        lse_smem.at[wg][...] = lse
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(row0, bq), h])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WARPGROUPS)
    def _produce():
        plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
        _stream(program_steps, num_stages, streams)


def flash_forward(q, k, v, *, causal, sm_scale, blocks: MosaicBlocks, q_seg=None,
                  kv_seg=None, interpret=None):
    """Hopper flash-attention forward on padded arrays.

    Args:
        q: [B, T, H, D] bfloat16 / float16, T a multiple of blocks.rows_per_program.
        k, v: [B, S, K, D] same dtype, S a multiple of blocks.block_kv; H a multiple of K.
            Causal calls need T == S.
        causal: mask keys after the query position.
        sm_scale: score multiplier.
        blocks: MosaicBlocks.
        q_seg, kv_seg: optional int [B, T] / [B, S] segment ids (packed documents; 0 is
            padding): a query sees only keys of its own non-zero id. Blocks are skipped or
            masked from block_sparsity's tables; rows that see nothing give 0 and LSE -inf.
        interpret: None to compile for the GPU, or a Mosaic GPU interpreter parameter object
            (tests on CPU).

    Returns:
        o [B, T, H, D] in q.dtype and the float32 log-sum-exp of the scaled scores, [B, H, T].
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    segments = q_seg is not None
    if segments != (kv_seg is not None):
        raise ValueError("pass both q_seg and kv_seg, or neither")
    reason = unsupported_reason(q.dtype, D)
    if reason is not None:
        raise ValueError(f"the Hopper flash-attention kernel does not support {reason}")
    bq, bk, stages = blocks.block_q, blocks.block_kv, blocks.num_stages
    if T % blocks.rows_per_program or S % bk:
        raise ValueError(f"lengths T={T}, S={S} must be multiples of {blocks.rows_per_program} "
                         f"and {bk} (pad them)")
    _check_scale_and_causality(sm_scale, causal, T, S)
    # A causal program may need fewer kv blocks than there are slots; never more than S has.
    stages = min(stages, S // bk)

    body = functools.partial(_forward_body, causal=causal, segments=segments,
                             c=float(sm_scale) * _LOG2E, bq=bq, bk=bk, num_stages=stages,
                             group=H // K, kv_len=S, q_tiles=T // blocks.rows_per_program)
    two = _COMPUTE_WARPGROUPS
    scratch = (
        (_smem_tiles((two, bq, D), q.dtype), _smem_tiles((stages, bk, D), q.dtype),
         _smem_tiles((stages, bk, D), q.dtype), plgpu.SMEM((two, bq), jnp.float32)),
        (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_barriers=two)),
        (plgpu.Barrier(num_arrivals=two, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=two),
    )
    args = (q, k, v)
    if segments:
        extra_in, extra_scratch = _segment_parts(q_seg, kv_seg, bq, bk, stages, causal=causal,
                                                 rows_are_queries=True)
        args, scratch = args + extra_in, scratch + extra_scratch
    return _launch("flash_attention_fwd_hopper", body, scratch, args,
                   out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                             jax.ShapeDtypeStruct((B, H, T), jnp.float32)),
                   grid=(H, T // blocks.rows_per_program, B),
                   grid_names=("heads", "q_tiles", "batch"), interpret=interpret)
