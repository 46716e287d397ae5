"""Flash attention for Hopper GPUs (sm_90) in Pallas Mosaic GPU: forward, dQ and dK/dV.

The Triton kernels of `flash_attention.py` express one program as whole-array operations and
leave the pipelining to Triton. On Hopper the fast formulation (FlashAttention-3, Shah et al.,
arXiv:2407.08608) needs what Triton does not expose: warpgroup matrix multiplies (wgmma) that
read shared memory directly, tensor-memory-accelerator (TMA) copies, and warp specialisation.
Mosaic GPU exposes all three, so this file writes that schedule explicitly.

Every kernel runs three warpgroups per program (CTA): two compute warpgroups that own 64-row
tiles each, and a producer warpgroup (`_stream`) that TMA-copies the blocks both compute
warpgroups walk over through `num_stages` shared-memory slots, refilling a slot once both
have signalled that they are done with it ("consumed" barriers, two arrivals each).

- forward: one program per 2 * block_q query rows of one (batch, query head); streams K and V.
  S = Q K^T is a wgmma from shared memory; P (bf16/f16, in registers) times V is a wgmma with
  a register operand. "Ping-pong" scheduling: a two-arrival barrier makes the compute
  warpgroups alternate, so one runs its softmax (exp on the multi-function units) while the
  other's matmul holds the tensor cores.
- dQ: one program per 2 * bwd_block_q query rows; streams K and V; per block S and dP =
  dO V^T are two wgmmas in flight, then dS = P (dP - delta) and dQ += dS K.
- dK/dV: one program per 2 * bwd_block_kv key rows of one (batch, kv head); streams Q, dO and
  the row statistics of all G query heads of that kv head, so GQA is reduced in registers
  without atomics. Rows are keys (the wgmma M dimension): S^T = K Q^T, dV += P^T dO with
  dP^T = V dO^T in flight, dK += dS^T Q.

Numerics: softmax exponents are base 2. With c = sm_scale * log2(e), the forward keeps its
running max m in units of c * score and p = exp2(c * s - m), one fused multiply-add per
exponent. The LSE it writes is the natural log of the scaled scores, the quantity the Triton
and interpreter kernels save, so forward and backward of either family mix; the backward
rescales it to base 2 once outside the kernels.

Scope (the wrapper in flash_attention.py falls back to Triton outside it): bf16 or f16,
head dim a multiple of 64 up to 256 (backward: up to 128, shared memory), no segment ids; the query length a multiple of
MosaicBlocks.q_multiple and the key length of kv_multiple (the wrapper pads; under causal
masking padded keys follow every real query, so they need no mask). Causal programs visit
only the blocks on their side of the diagonal and mask elementwise only on the blocks that
cross it. Every causal row sees at least key 0 in the first block it visits, so the running
max is finite from the first step on and no row can produce 0/0.

Letters: B batch, T query length, S key length, H query heads, K kv heads, G = H // K,
D head dim; bq / bk query / kv block sizes.
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

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_COMPUTE_WARPGROUPS = 2
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


def unsupported_reason(dtype, head_dim: int, *, segments: bool,
                       backward: bool = False) -> str | None:
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
    if segments:
        return "segment ids / key padding masks"
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


def _forward_body(q_ref, k_ref, v_ref, o_ref, lse_ref, smem, loaded, consumed, pingpong, *,
                  causal, c, bq, bk, num_stages, group, kv_len):
    """Kernel body of one program; `wg` (0, 1: compute, 2: producer) picks the role.

    Refs: q / o [B, T, H, D], k / v [B, S, K, D] in HBM, lse float32 [B, H, T] in HBM;
    smem = (qo [2, bq, D], k [stages, bk, D], v [stages, bk, D], lse [2, bq]);
    loaded = (k [stages], v [stages], q [2]) TMA barriers; consumed = (k, v) [stages] barriers
    with one arrival per compute warpgroup; pingpong: one two-arrival barrier.
    """
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    # Causal attention has T == S, so the kv length also counts the query tiles.
    tile = _query_tile(causal, kv_len // (_COMPUTE_WARPGROUPS * bq))
    wg = lax.axis_index("wg")
    qo_smem, k_smem, v_smem, lse_smem = smem
    k_loaded, v_loaded, q_loaded = loaded
    k_consumed, v_consumed = consumed
    D = qo_smem.shape[-1]
    dtype = qo_smem.dtype

    if causal:
        program_steps = _kv_steps_before((tile + 1) * (_COMPUTE_WARPGROUPS * bq), bk)
    else:
        program_steps = kv_len // bk
    kv_rows = lambda j: (b, pl.ds(j * bk, bk), lax.div(h, jnp.int32(group)))
    streams = [(lambda j: k_ref.at[kv_rows(j)], k_smem, k_loaded, k_consumed),
               (lambda j: v_ref.at[kv_rows(j)], v_smem, v_loaded, v_consumed)]

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
        m = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), rows)
        l = plgpu.layout_cast(jnp.full((bq,), 0.0, jnp.float32), rows)
        acc = plgpu.layout_cast(jnp.full((bq, D), 0.0, jnp.float32), plgpu.Layout.WGMMA)

        @pl.when(steps > 0)
        def _():
            plgpu.barrier_wait(k_loaded.at[0])

        # Warpgroup 1 starts half a step behind warpgroup 0: the ping-pong offset.
        pl.when(wg == 1)(pingpong_sync)

        def step(j, carry, *, masked):
            acc, m, l = carry
            slot = lax.rem(j, jnp.int32(num_stages))

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                pingpong_sync()
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC((bq, bk), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])
            if masked:
                q_pos = row0 + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0,
                                                      layout=plgpu.Layout.WGMMA)
                k_pos = j * bk + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1,
                                                        layout=plgpu.Layout.WGMMA)
                s = jnp.where(q_pos >= k_pos, s, -jnp.inf)

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

                # Wait for the next K while this matmul runs.
                @pl.when(nxt < steps)
                def _():
                    plgpu.barrier_wait(k_loaded.at[lax.rem(nxt, jnp.int32(num_stages))])

                return acc_ref[...]

            acc = pl.run_scoped(values, plgpu.ACC((bq, D), jnp.float32))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, m_new, l

        carry = (acc, m, l)
        if causal:
            # Blocks entirely left of the diagonal need no mask; the rest cross it.
            unmasked = lax.div(row0, jnp.int32(bk))
            carry = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), carry)
            carry = lax.fori_loop(unmasked, steps, functools.partial(step, masked=True), carry)

            # Blocks only the other warpgroup needs: keep the ping-pong arrivals equal (two
            # syncs per step, as in `step`) and release them (see `_stream`). Syncing first
            # lets the other warpgroup run step j - 1's P V without waiting for block j.
            @pl.loop(steps, program_steps)
            def _(j):
                pingpong_sync()
                pingpong_sync()
                _pass_over(j, num_stages, streams)
        else:
            carry = lax.fori_loop(0, steps, functools.partial(step, masked=False), carry)
        acc, m, l = carry
        pl.when(wg == 0)(pingpong_sync)

        acc = acc * lax.broadcast_in_dim(1.0 / l, acc.shape, [0])
        q_smem[...] = acc.astype(dtype)              # queries are no longer needed
        lse_smem.at[wg][...] = (m + jnp.log2(l)) * _LN2
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(row0, bq), h])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WARPGROUPS)
    def _produce():
        plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
        _stream(program_steps, num_stages, streams)


def flash_forward(q, k, v, *, causal, sm_scale, blocks: MosaicBlocks, interpret=None):
    """Hopper flash-attention forward on padded arrays.

    Args:
        q: [B, T, H, D] bfloat16 / float16, T a multiple of blocks.rows_per_program.
        k, v: [B, S, K, D] same dtype, S a multiple of blocks.block_kv; H a multiple of K.
            Causal calls need T == S.
        causal: mask keys after the query position.
        sm_scale: score multiplier.
        blocks: MosaicBlocks.
        interpret: None to compile for the GPU, or a Mosaic GPU interpreter parameter object
            (tests on CPU).

    Returns:
        o [B, T, H, D] in q.dtype and the float32 log-sum-exp of the scaled scores, [B, H, T].
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    reason = unsupported_reason(q.dtype, D, segments=False)
    if reason is not None:
        raise ValueError(f"the Hopper flash-attention kernel does not support {reason}")
    bq, bk, stages = blocks.block_q, blocks.block_kv, blocks.num_stages
    if T % blocks.rows_per_program or S % bk:
        raise ValueError(f"lengths T={T}, S={S} must be multiples of {blocks.rows_per_program} "
                         f"and {bk} (pad them)")
    _check_scale_and_causality(sm_scale, causal, T, S)
    # A causal program may need fewer kv blocks than there are slots; never more than S has.
    stages = min(stages, S // bk)

    body = functools.partial(_forward_body, causal=causal, c=float(sm_scale) * _LOG2E, bq=bq,
                             bk=bk, num_stages=stages, group=H // K, kv_len=S)
    # (8, 64) tiles with a 128-byte swizzle: the layout wgmma reads 2-byte operands from.
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        (plgpu.SMEM((_COMPUTE_WARPGROUPS, bq, D), q.dtype, transforms=transforms),
         plgpu.SMEM((stages, bk, D), q.dtype, transforms=transforms),
         plgpu.SMEM((stages, bk, D), q.dtype, transforms=transforms),
         plgpu.SMEM((_COMPUTE_WARPGROUPS, bq), jnp.float32)),
        (plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_barriers=_COMPUTE_WARPGROUPS)),
        (plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS),
    )

    # The entry functions' names are the kernels' names (profiles, jaxprs).
    def flash_attention_fwd_hopper(q_ref, k_ref, v_ref, o_ref, lse_ref):
        pl.run_scoped(lambda *scoped: body(q_ref, k_ref, v_ref, o_ref, lse_ref, *scoped),
                      *scratch, collective_axes="wg")

    kwargs = {} if interpret is None else {"interpret": interpret}
    o, lse = plgpu.kernel(
        flash_attention_fwd_hopper,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((B, H, T), jnp.float32)),
        grid=(H, T // blocks.rows_per_program, B),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=_COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kwargs,
    )(q, k, v)
    return o, lse


# ------------------------------------------------------------------------------------------
# Backward: dQ and dK/dV kernels (FlashAttention-2 Alg. 2 split in two, no atomics)
# ------------------------------------------------------------------------------------------

def _issue_scores(a_smem, b_smem, shape):
    """a [M, D] x b [N, D]^T -> [M, N] float32 with one wgmma (b read through a transpose)."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _accumulate(acc, a, b_smem):
    """acc + a @ b with a [M, K] in registers and b [K, N] in shared memory (float32 acc)."""
    def body(acc_ref):
        acc_ref[...] = acc
        plgpu.wgmma(acc_ref, a, b_smem)
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(acc.shape, jnp.float32))


def _dq_body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, smem, row_loaded,
             loaded, consumed, *, causal, c, sm_scale, bq, bk, num_stages, group, kv_len):
    """dQ program: 2 * bq query rows of one (batch, query head); streams K and V blocks.

    Per kv block: S = Q K^T and dP = dO V^T (two wgmmas in flight), P = exp2(c S - lse2),
    dS = P (dP - delta), dQ += dS K; finally dQ *= sm_scale.
    Refs: q / do / dq [B, T, H, D], k / v [B, S, K, D], lse (log2 units) / delta float32
    [B, H, T]. smem = (q, do [2, bq, D], lse, delta [2, bq], k, v [stages, bk, D]);
    row_loaded: four [2] barriers (q, do, lse, delta); loaded / consumed: (k, v) [stages].
    """
    b, h = lax.axis_index("batch"), lax.axis_index("heads")
    tile = _query_tile(causal, kv_len // (_COMPUTE_WARPGROUPS * bq))    # causal: T == S
    wg = lax.axis_index("wg")
    q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem = smem
    (k_loaded, v_loaded), (k_consumed, v_consumed) = loaded, consumed
    D, dtype = q_smem.shape[-1], q_smem.dtype
    rows_per_program = _COMPUTE_WARPGROUPS * bq
    if causal:
        program_steps = _kv_steps_before((tile + 1) * rows_per_program, bk)
    else:
        program_steps = kv_len // bk
    kv_rows = lambda j: (b, pl.ds(j * bk, bk), lax.div(h, jnp.int32(group)))
    streams = [(lambda j: k_ref.at[kv_rows(j)], k_smem, k_loaded, k_consumed),
               (lambda j: v_ref.at[kv_rows(j)], v_smem, v_loaded, v_consumed)]

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

        def step(j, dq, *, masked):
            slot = _slot(j, num_stages)
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
            if masked:
                q_pos = row0 + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 0,
                                                      layout=plgpu.Layout.WGMMA)
                k_pos = j * bk + plgpu.broadcasted_iota(jnp.int32, (bq, bk), 1,
                                                        layout=plgpu.Layout.WGMMA)
                p = jnp.where(q_pos >= k_pos, p, 0.0)
            ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))
            dq = _accumulate(dq, ds.astype(dtype), k_smem.at[slot])
            plgpu.barrier_arrive(k_consumed.at[slot])
            return dq

        if causal:
            unmasked = lax.div(row0, jnp.int32(bk))
            dq = lax.fori_loop(0, unmasked, functools.partial(step, masked=False), dq)
            dq = lax.fori_loop(unmasked, steps, functools.partial(step, masked=True), dq)

            @pl.loop(steps, program_steps)
            def _(j):
                _pass_over(j, num_stages, streams)
        else:
            dq = lax.fori_loop(0, steps, functools.partial(step, masked=False), dq)

        q_smem.at[wg][...] = (dq * sm_scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WARPGROUPS)
    def _produce():
        plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
        _stream(program_steps, num_stages, streams)


def _dkv_body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, smem,
              row_loaded, loaded, consumed, *, causal, c, sm_scale, bq, bk, num_stages, group,
              q_len):
    """dK/dV program: 2 * bk key rows of one (batch, kv head); streams the query blocks of
    all `group` query heads of that kv head (GQA reduced here, no atomics).

    Per query block (transposed so the key rows are the wgmma M dimension):
    S^T = K Q^T, P^T = exp2(c S^T - lse2), dV += P^T dO and dP^T = V dO^T (in flight
    together), dS^T = P^T (dP^T - delta), dK += dS^T Q; finally dK *= sm_scale.
    smem = (k, v [2, bk, D], q, do [stages, bq, D], lse, delta [stages, bq]);
    row_loaded: (k, v) [2]; loaded / consumed: (q, do, lse, delta) [stages].
    """
    b, kh = lax.axis_index("batch"), lax.axis_index("kv_heads")
    tile, wg = lax.axis_index("kv_tiles"), lax.axis_index("wg")
    k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem = smem
    q_loaded, do_loaded, lse_loaded, delta_loaded = loaded
    q_consumed, do_consumed, lse_consumed, delta_consumed = consumed
    D, dtype = k_smem.shape[-1], k_smem.dtype
    rows_per_program = _COMPUTE_WARPGROUPS * bk
    n_q = q_len // bq
    # Causal: query blocks that end before the program's first key see none of its keys.
    q_begin = lax.div(tile * rows_per_program, jnp.int32(bq)) if causal else 0
    per_head = n_q - q_begin
    program_steps = group * per_head

    def head_and_block(j):
        return kh * group + lax.div(j, per_head), q_begin + lax.rem(j, per_head)

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

        def step(i, carry, *, base, masked):
            dk, dv = carry
            slot = _slot(base + i, num_stages)
            plgpu.barrier_wait(q_loaded.at[slot])
            plgpu.barrier_wait(lse_loaded.at[slot])
            s_t = _issue_scores(k_smem.at[wg], q_smem.at[slot], (bk, bq))
            lse = plgpu.load(lse_smem.at[slot], (), layout=col_vector)
            plgpu.barrier_arrive(lse_consumed.at[slot])
            p_t = jnp.exp2(s_t * c - lax.broadcast_in_dim(lse, s_t.shape, [1]))
            if masked:
                k_pos = k0 + plgpu.broadcasted_iota(jnp.int32, (bk, bq), 0,
                                                    layout=plgpu.Layout.WGMMA)
                q_pos = i * bq + plgpu.broadcasted_iota(jnp.int32, (bk, bq), 1,
                                                        layout=plgpu.Layout.WGMMA)
                p_t = jnp.where(q_pos >= k_pos, p_t, 0.0)
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
                   interpret=None):
    """Hopper flash-attention backward on padded arrays: (dq, dk, dv).

    Args:
        q, do: [B, T, H, D] bfloat16 / float16, T a multiple of blocks.q_multiple.
        k, v: [B, S, K, D] same dtype, S a multiple of blocks.kv_multiple.
        lse: float32 [B, H, T] natural log-sum-exp of the scaled scores (the forward's).
        delta: float32 [B, H, T] rowsum(o * do) (minus any LSE cotangent).
        causal, sm_scale, blocks, interpret: as in flash_forward.

    Returns:
        dq like q, dk like k, dv like v.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    reason = unsupported_reason(q.dtype, D, segments=False, backward=True)
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
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    tiles = lambda *shape: plgpu.SMEM(shape, q.dtype, transforms=transforms)
    vectors = lambda *shape: plgpu.SMEM(shape, jnp.float32)
    two = _COMPUTE_WARPGROUPS
    kwargs = {} if interpret is None else {"interpret": interpret}
    common = dict(num_threads=two + 1, thread_name="wg",
                  compiler_params=plgpu.CompilerParams(approx_math=True), **kwargs)

    dq_stages = min(stages, S // bk)
    dq_body = functools.partial(_dq_body, causal=causal, c=c, sm_scale=float(sm_scale), bq=bq,
                                bk=bk, num_stages=dq_stages, group=H // K, kv_len=S)
    dq_scratch = (
        (tiles(two, bq, D), tiles(two, bq, D), vectors(two, bq), vectors(two, bq),
         tiles(dq_stages, bk, D), tiles(dq_stages, bk, D)),
        (plgpu.Barrier(num_barriers=two),) * 4,
        (plgpu.Barrier(num_barriers=dq_stages),) * 2,
        (plgpu.Barrier(num_arrivals=two, num_barriers=dq_stages),) * 2,
    )

    def flash_attention_dq_hopper(*refs):
        pl.run_scoped(lambda *scoped: dq_body(*refs, *scoped), *dq_scratch, collective_axes="wg")

    dq = plgpu.kernel(
        flash_attention_dq_hopper, out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(H, T // (two * bq), B), grid_names=("heads", "q_tiles", "batch"),
        **common)(q, k, v, do, lse2, delta)

    dkv_stages = min(stages, H // K * (T // bq))     # more slots than steps would idle
    dkv_body = functools.partial(_dkv_body, causal=causal, c=c, sm_scale=float(sm_scale),
                                 bq=bq, bk=bk, num_stages=dkv_stages, group=H // K, q_len=T)
    dkv_scratch = (
        (tiles(two, bk, D), tiles(two, bk, D), tiles(dkv_stages, bq, D),
         tiles(dkv_stages, bq, D), vectors(dkv_stages, bq), vectors(dkv_stages, bq)),
        (plgpu.Barrier(num_barriers=two),) * 2,
        (plgpu.Barrier(num_barriers=dkv_stages),) * 4,
        (plgpu.Barrier(num_arrivals=two, num_barriers=dkv_stages),) * 4,
    )

    def flash_attention_dkv_hopper(*refs):
        pl.run_scoped(lambda *scoped: dkv_body(*refs, *scoped), *dkv_scratch,
                      collective_axes="wg")

    dk, dv = plgpu.kernel(
        flash_attention_dkv_hopper,
        out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(K, S // (two * bk), B), grid_names=("kv_heads", "kv_tiles", "batch"),
        **common)(q, k, v, do, lse2, delta)
    return dq, dk, dv
