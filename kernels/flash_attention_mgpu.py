"""Flash-attention forward for Hopper GPUs (sm_90) in Pallas Mosaic GPU.

The Triton kernels of `flash_attention.py` express one program as whole-array operations and
leave the pipelining to Triton. On Hopper the fast formulation (FlashAttention-3, Shah et al.,
arXiv:2407.08608) needs what Triton does not expose: warpgroup matrix multiplies (wgmma) that
read shared memory directly, tensor-memory-accelerator (TMA) copies, and warp specialisation.
Mosaic GPU exposes all three, so this file writes that schedule explicitly.

One program (CTA) owns 2 * block_q query rows of one (batch, query head) and runs three
warpgroups:
- warpgroups 0 and 1 compute: each owns block_q rows, keeps its queries in shared memory,
  and walks the kv blocks with an online softmax in float32 registers. S = Q K^T is a wgmma
  from shared memory; P (bf16/f16, in registers) times V is a wgmma with a register operand.
- warpgroup 2 is the producer: it streams K and V blocks of the program's kv head through
  `num_stages` shared-memory slots with TMA, refilling a slot once both compute warpgroups
  have signalled that they are done with it ("consumed" barriers, two arrivals each).
- "ping-pong" scheduling: a two-arrival barrier makes the compute warpgroups alternate, so
  one runs its softmax (exp on the multi-function units) while the other's matmul holds the
  tensor cores.

Numerics: the softmax runs in base 2. With c = sm_scale * log2(e), the running max m is kept
in units of c * score, p = exp2(c * s - m), so one fused multiply-add forms each exponent.
The log-sum-exp written for the backward is converted back to natural log of the scaled
scores, the same quantity the Triton and interpreter kernels save.

Scope (the wrapper in flash_attention.py falls back to Triton outside it): bf16 or f16,
head dim a multiple of 64 up to 256, no segment ids, the query length a multiple of
2 * block_q and the key length a multiple of block_kv (the wrapper pads; under causal
masking padded keys follow every real query, so they need no mask). Causal programs visit
only the kv blocks left of their diagonal and mask elementwise only on the blocks that
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

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_COMPUTE_WARPGROUPS = 2


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    """Tiles of the Hopper forward.

    block_q: query rows per compute warpgroup (a program owns 2 * block_q rows); a
        multiple of 64, the wgmma M tile of one warpgroup.
    block_kv: keys per pipeline step; a multiple of 64.
    num_stages: K/V shared-memory slots in flight (>= 2 to overlap TMA with compute).
    Shared memory holds 2*bq*D (Q, reused for O) + 2*num_stages*bk*D elements: at D = 128 in
    bf16 with 64 / 128 / 2 that is 160 KiB of the H100/H200's 227 KiB.
    """
    block_q: int = 64
    block_kv: int = 128
    num_stages: int = 2

    def __post_init__(self):
        if self.block_q % 64 or self.block_kv % 64:
            raise ValueError(f"block_q ({self.block_q}) and block_kv ({self.block_kv}) must be "
                             "multiples of 64 for the Hopper kernel")
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be at least 2, got {self.num_stages}")

    @classmethod
    def default(cls, head_dim: int) -> "MosaicBlocks":
        """Largest kv block whose two stages fit shared memory: 256 / 128 / 64 keys up to
        D = 64 / 128 / 256 (160 / 160 / 192 KiB in bf16)."""
        return cls(block_kv=256 if head_dim <= 64 else 128 if head_dim <= 128 else 64)

    @property
    def rows_per_program(self) -> int:
        return _COMPUTE_WARPGROUPS * self.block_q


def unsupported_reason(dtype, head_dim: int, *, segments: bool) -> str | None:
    """Why the Hopper kernel cannot run a call (None when it can)."""
    if jnp.dtype(dtype) not in _SUPPORTED_DTYPES:
        return f"dtype {jnp.dtype(dtype).name} (needs bfloat16 or float16)"
    if head_dim % 64 or head_dim > 256:
        return f"head dim {head_dim} (needs a multiple of 64 up to 256)"
    if segments:
        return "segment ids / key padding masks"
    return None


def _kv_steps_before(row_end, bk):
    """Number of kv blocks a causal row range ending (exclusively) at row_end touches."""
    return lax.div(row_end + (bk - 1), jnp.int32(bk))


def _forward_body(q_ref, k_ref, v_ref, o_ref, lse_ref, smem, loaded, consumed, pingpong, *,
                  causal, c, bq, bk, num_stages, group, kv_len):
    """Kernel body of one program; `wg` (0, 1: compute, 2: producer) picks the role.

    Refs: q / o [B, T, H, D], k / v [B, S, K, D] in HBM, lse float32 [B, H, T] in HBM;
    smem = (qo [2, bq, D], k [stages, bk, D], v [stages, bk, D], lse [2, bq]);
    loaded = (k [stages], v [stages], q [2]) TMA barriers; consumed = (k, v) [stages] barriers
    with one arrival per compute warpgroup; pingpong: one two-arrival barrier.
    """
    from jax.experimental.pallas import mosaic_gpu as plgpu

    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    tile = lax.axis_index("q_tiles")
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

    def pingpong_sync():
        plgpu.barrier_arrive(pingpong)
        plgpu.barrier_wait(pingpong)

    @pl.when(wg < _COMPUTE_WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
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

            # Blocks only the other warpgroup needs: observe their loads (a barrier's phase
            # parity is tracked per waiting thread, so no phase may be skipped), release the
            # slots, and keep the ping-pong arrivals equal (two syncs per step, as in `step`).
            @pl.loop(steps, program_steps)
            def _(j):
                slot = lax.rem(j, jnp.int32(num_stages))
                plgpu.barrier_wait(k_loaded.at[slot])
                plgpu.barrier_wait(v_loaded.at[slot])
                plgpu.barrier_arrive(k_consumed.at[slot])
                plgpu.barrier_arrive(v_consumed.at[slot])
                pingpong_sync()
                pingpong_sync()
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
        plgpu.set_max_registers(40, action="decrease")
        kh = lax.div(h, jnp.int32(group))

        def load(j, slot):
            rows = (b, pl.ds(j * bk, bk), kh)
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_loaded.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_loaded.at[slot])

        for slot in range(num_stages):
            pl.when(slot < program_steps)(functools.partial(load, slot, slot))

        @pl.loop(num_stages, program_steps)
        def _(j):
            slot = lax.rem(j, jnp.int32(num_stages))
            rows = (b, pl.ds(j * bk, bk), kh)
            plgpu.barrier_wait(k_consumed.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_loaded.at[slot])
            plgpu.barrier_wait(v_consumed.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_loaded.at[slot])

        # Observe the releases of the last blocks too, so that every phase of the consumed
        # barriers is waited for (the compute warpgroups finish first; this costs nothing).
        @pl.loop(jnp.maximum(program_steps - num_stages, 0), program_steps)
        def _(j):
            slot = lax.rem(j, jnp.int32(num_stages))
            plgpu.barrier_wait(k_consumed.at[slot])
            plgpu.barrier_wait(v_consumed.at[slot])


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
    from jax.experimental.pallas import mosaic_gpu as plgpu

    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    reason = unsupported_reason(q.dtype, D, segments=False)
    if reason is not None:
        raise ValueError(f"the Hopper flash-attention kernel does not support {reason}")
    bq, bk, stages = blocks.block_q, blocks.block_kv, blocks.num_stages
    if T % blocks.rows_per_program or S % bk:
        raise ValueError(f"lengths T={T}, S={S} must be multiples of {blocks.rows_per_program} "
                         f"and {bk} (pad them)")
    if causal and T != S:
        raise ValueError(f"causal attention needs T == S, got {T}, {S}")
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

    def entry(q_ref, k_ref, v_ref, o_ref, lse_ref):
        pl.run_scoped(lambda *scoped: body(q_ref, k_ref, v_ref, o_ref, lse_ref, *scoped),
                      *scratch, collective_axes="wg")

    kwargs = {} if interpret is None else {"interpret": interpret}
    o, lse = plgpu.kernel(
        entry,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((B, H, T), jnp.float32)),
        grid=(H, T // blocks.rows_per_program, B),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=_COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        kernel_name="flash_attention_fwd_hopper",
        **kwargs,
    )(q, k, v)
    return o, lse
