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

The three kernel bodies are in `flash_kernels.py`; this file builds their
pallas_calls, the custom VJP and the public wrapper.

Block skipping (`kernels/block_sparsity.py`): each (query block, kv block) pair is SKIP
(nothing visible: not visited), FULL (no elementwise mask) or MASKED. With segment ids the
wrapper computes small per-block tables outside the kernels and each kernel walks only the
blocks they allow; causal attention without segment ids needs no tables (closed-form ranges).

Lengths that are not a multiple of the block size are padded inside the wrapper: padded keys
get segment id 0 (masked), padded rows are sliced off. Under causal masking without segment
ids no mask is needed for the padding: padded keys come after every real query.

Backends (picked from `jax.default_backend()` unless `interpret=True`):
- interpret: the same pallas_call run by the Pallas interpreter (CPU tests).
- gpu: the Triton backend (`pallas.triton.CompilerParams` with num_warps/num_stages) for all
  three kernels: they are written in the array-per-program style that Triton lowers and the
  Pallas interpreter runs, so one formulation is tested on CPU and runs on GPU.
  `BlockSizes(gpu_forward="mosaic", gpu_backward="mosaic")` replaces the forward and/or the
  backward on Hopper with the warp-specialised Mosaic GPU kernels of
  `flash_mgpu.py` / `flash_mgpu_bwd.py` (wgmma, TMA, a producer
  warpgroup) where they apply (bf16/f16, head dim a multiple of 64 up to 256 (backward: 128);
  segment ids and the key padding mask through the same block tables as here) and keeps
  Triton elsewhere; both families save the same LSE, so they mix freely. Triton is
  the default until they are measured against each other on a Hopper GPU
  (benchmarks/attention.py runs both). The Mosaic kernels run on CPU in jax's Mosaic GPU
  interpreter (tests/kernels/_mgpu_interpret.py): pass its `InterpretGPUParams` as
  `interpret=` to use them inside this wrapper.
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
from jax import lax
from jax.experimental import pallas as pl

from instructjax.kernels import block_sparsity as bsp
from instructjax.kernels import flash_mgpu as mgpu
from instructjax.kernels import flash_mgpu_bwd as mgpu_bwd
from instructjax.kernels.flash_kernels import dkdv_kernel, dq_kernel, fwd_kernel


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
    gpu_forward / gpu_backward: "triton", or "mosaic" for the Hopper kernels of
        flash_mgpu.py wherever they apply (Triton elsewhere).
    mosaic: the Mosaic kernels' tiles; None = MosaicBlocks.default(head dim).
    Blocks are clamped to the (power-of-two rounded) sequence length for short inputs.
    """
    block_q: int = 128
    block_kv: int = 128
    block_q_bwd: int = 128
    block_kv_bwd: int = 128
    num_warps: int | None = None
    num_stages: int | None = None
    gpu_forward: str = "triton"
    gpu_backward: str = "triton"
    mosaic: mgpu.MosaicBlocks | None = None

    def __post_init__(self):
        for name in ("gpu_forward", "gpu_backward"):
            if getattr(self, name) not in ("triton", "mosaic"):
                raise ValueError(f"{name} must be 'triton' or 'mosaic', got "
                                 f"{getattr(self, name)!r}")

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
    mosaic: mgpu.MosaicBlocks | None = None   # tiles of the Hopper kernels in use
    mosaic_forward: bool = False
    mosaic_backward: bool = False
    mosaic_interpret: object = None           # InterpretGPUParams for the CPU interpreter

    @property
    def heads_major(self):
        """Kernel arrays are [B, H, T, D] on TPU (tiling), [B, T, H, D] elsewhere."""
        return self.target == "tpu"


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


def _compiler_params(cfg, num_grid_dims):
    """Backend options: Triton launch shape on GPU; on TPU every grid axis is independent."""
    if cfg.target == "gpu":
        from jax.experimental.pallas import triton as plt
        return plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if cfg.target == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return pltpu.CompilerParams(dimension_semantics=("parallel",) * num_grid_dims)
    return None


def _seq_spec(cfg, block, D, index_map):
    """[block, D] tiles of a [B, T, H, D] (or [B, H, T, D]) array.

    index_map(*grid) -> (b, head, seq_block).
    """
    def index(*grid):
        b, h, s = index_map(*grid)
        return (b, h, s, 0) if cfg.heads_major else (b, s, h, 0)

    if cfg.heads_major:
        return pl.BlockSpec((None, None, block, D), index)
    return pl.BlockSpec((None, block, None, D), index)


def _group_spec(cfg, G, length, D):
    """All G query heads of kv head `kh`, whole sequence: grid (b, kh, _) -> [T, G, D]."""
    if cfg.heads_major:
        return pl.BlockSpec((None, G, length, D), lambda b, kh, j: (b, kh, 0, 0))
    return pl.BlockSpec((None, length, G, D), lambda b, kh, j: (b, 0, kh, 0))


def _lse_spec(block):
    """[block] tiles of a [B, H, 1, T] float32 row statistic for grid (b, h, block i).

    The unit axis keeps TPU's last-two-dims tiling rule satisfied without a rank-1 block.
    """
    return pl.BlockSpec((None, None, None, block), lambda b, h, i: (b, h, 0, i))


def _query_row_specs(cfg, bq, S, D, G):
    """Specs for programs over grid (b, h, query block i), as in the forward and dQ kernels:
    the [bq, D] tile of head h (q, do, o, dq) and the whole [S, D] row of kv head h // G."""
    return (_seq_spec(cfg, bq, D, lambda b, h, i: (b, h, i)),
            _seq_spec(cfg, S, D, lambda b, h, i: (b, lax.div(h, G), 0)))


def _segment_inputs(cfg, q_seg, kv_seg, bq, bk, *, rows_are_queries):
    """Segment mode's inputs around the kernel's own, or None without segments.

    Returns (before, after), lists of (array, spec): before, the two int32 block_tables; after,
    the [B, 1, T] / [B, 1, S] ids as this program's block and the other side's whole row
    (query-row grid (b, h, i): q_seg [bq], kv_seg [S]; kv-row grid (b, kh, j): q_seg [T],
    kv_seg [bk]).
    """
    if not cfg.segments:
        return None
    T, S = q_seg.shape[-1], kv_seg.shape[-1]
    if rows_are_queries:
        row_block, col_block = bq, bk
        q_seg_spec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, 0, i))
        kv_seg_spec = pl.BlockSpec((None, None, S), lambda b, h, i: (b, 0, 0))
    else:
        row_block, col_block = bk, bq
        q_seg_spec = pl.BlockSpec((None, None, T), lambda b, kh, j: (b, 0, 0))
        kv_seg_spec = pl.BlockSpec((None, None, bk), lambda b, kh, j: (b, 0, j))
    row_tab, col_tab = bsp.block_tables(q_seg[:, 0, :], kv_seg[:, 0, :], row_block, col_block,
                                        causal=cfg.causal, rows_are_queries=rows_are_queries)
    if cfg.target == "tpu":      # the tables are read as scalars: SMEM on TPU
        from jax.experimental.pallas import tpu as pltpu
        table_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
    else:
        table_spec = pl.BlockSpec()
    return ([(row_tab, table_spec), (col_tab, table_spec)],
            [(q_seg, q_seg_spec), (kv_seg, kv_seg_spec)])


def _call(cfg, kernel, name, *, grid, ins, outs, segment_inputs):
    """pl.pallas_call(kernel) for cfg's backend -> list of outputs.

    ins: [(array, BlockSpec)] and outs: [(ShapeDtypeStruct, BlockSpec)], in the kernel's ref
    order; segment_inputs: from _segment_inputs (wrapped around `ins`), or None.
    """
    if segment_inputs is not None:
        before, after = segment_inputs
        ins = before + ins + after
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[spec for _, spec in ins],
        out_specs=[spec for _, spec in outs],
        out_shape=[shape for shape, _ in outs],
        compiler_params=_compiler_params(cfg, len(grid)),
        interpret=cfg.target == "interpret",
        name=name,
    )(*(x for x, _ in ins))


def _fwd_call(cfg, q, k, v, q_seg, kv_seg):
    """Forward pallas_call on kernel-layout arrays -> (o like q, lse float32 [B, H, 1, T])."""
    if cfg.mosaic_forward:
        segs = (q_seg[:, 0, :], kv_seg[:, 0, :]) if cfg.segments else (None, None)
        o, lse = mgpu.flash_forward(q, k, v, causal=cfg.causal, sm_scale=cfg.sm_scale,
                                    blocks=cfg.mosaic, q_seg=segs[0], kv_seg=segs[1],
                                    interpret=cfg.mosaic_interpret)
        return o, lse[:, :, None, :]
    B, T, H, D, S, K = _dims(cfg, q, k)
    bq, bk = cfg.block_q, cfg.block_kv
    q_spec, kv_spec = _query_row_specs(cfg, bq, S, D, H // K)
    o, lse = _call(
        cfg, functools.partial(fwd_kernel, cfg=cfg, n_kv=S // bk), "flash_attention_fwd",
        grid=(B, H, T // bq),
        ins=[(q, q_spec), (k, kv_spec), (v, kv_spec)],
        outs=[(jax.ShapeDtypeStruct(q.shape, q.dtype), q_spec),
              (jax.ShapeDtypeStruct((B, H, 1, T), jnp.float32), _lse_spec(bq))],
        segment_inputs=_segment_inputs(cfg, q_seg, kv_seg, bq, bk, rows_are_queries=True))
    return o, lse


def _dq_call(cfg, q, k, v, do, lse, delta, q_seg, kv_seg):
    """dQ pallas_call -> dq like q (lse, delta: float32 [B, H, 1, T])."""
    B, T, H, D, S, K = _dims(cfg, q, k)
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    q_spec, kv_spec = _query_row_specs(cfg, bq, S, D, H // K)
    (dq,) = _call(
        cfg, functools.partial(dq_kernel, cfg=cfg, n_kv=S // bk), "flash_attention_dq",
        grid=(B, H, T // bq),
        ins=[(q, q_spec), (k, kv_spec), (v, kv_spec), (do, q_spec), (lse, _lse_spec(bq)),
             (delta, _lse_spec(bq))],
        outs=[(jax.ShapeDtypeStruct(q.shape, q.dtype), q_spec)],
        segment_inputs=_segment_inputs(cfg, q_seg, kv_seg, bq, bk, rows_are_queries=True))
    return dq


def _dkdv_call(cfg, q, k, v, do, lse, delta, q_seg, kv_seg):
    """dK/dV pallas_call -> (dk like k, dv like v) (lse, delta: float32 [B, H, 1, T]).

    Grid (b, kv head kh, kv block j): k, v, dk, dv are [bk, D] tiles; q, do, lse and delta
    are the whole rows of the group's G query heads.
    """
    B, T, H, D, S, K = _dims(cfg, q, k)
    G = H // K
    bq, bk = cfg.block_q_bwd, cfg.block_kv_bwd
    kv_spec = _seq_spec(cfg, bk, D, lambda b, kh, j: (b, kh, j))
    group_spec = _group_spec(cfg, G, T, D)
    stat_spec = pl.BlockSpec((None, G, None, T), lambda b, kh, j: (b, kh, 0, 0))
    dk, dv = _call(
        cfg, functools.partial(dkdv_kernel, cfg=cfg, n_q=T // bq, G=G), "flash_attention_dkdv",
        grid=(B, K, S // bk),
        ins=[(q, group_spec), (k, kv_spec), (v, kv_spec), (do, group_spec), (lse, stat_spec),
             (delta, stat_spec)],
        outs=[(jax.ShapeDtypeStruct(k.shape, k.dtype), kv_spec),
              (jax.ShapeDtypeStruct(v.shape, v.dtype), kv_spec)],
        segment_inputs=_segment_inputs(cfg, q_seg, kv_seg, bq, bk, rows_are_queries=False))
    return dk, dv


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
    if cfg.mosaic_backward:
        segs = (q_seg[:, 0, :], kv_seg[:, 0, :]) if cfg.segments else (None, None)
        dq, dk, dv = mgpu_bwd.flash_backward(q, k, v, do, lse[:, :, 0], delta[:, :, 0],
                                             causal=cfg.causal, sm_scale=cfg.sm_scale,
                                             blocks=cfg.mosaic, q_seg=segs[0],
                                             kv_seg=segs[1], interpret=cfg.mosaic_interpret)
        return dq, dk, dv, None, None
    dq = _dq_call(cfg, q, k, v, do, lse, delta, q_seg, kv_seg)
    dk, dv = _dkdv_call(cfg, q, k, v, do, lse, delta, q_seg, kv_seg)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------
# Public wrapper
# ------------------------------------------------------------------------------------------

def _clamp_block(block, length):
    """Shrink a block to the sequence (next power of two, at least 16: Triton's dot minimum)."""
    return min(block, max(16, 1 << max(0, int(length) - 1).bit_length()))


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
        interpret: run in the Pallas interpreter (required on CPU). A Mosaic GPU
            `InterpretGPUParams` also interprets the Hopper kernels that block_sizes asks
            for (gpu_forward / gpu_backward="mosaic"); see tests/kernels/_mgpu_interpret.py.
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
    gpu_interpreter = interpret if type(interpret).__name__ == "InterpretGPUParams" else None
    scale = float(D ** -0.5 if sm_scale is None else sm_scale)
    # On a real GPU only Hopper has wgmma; `_target="gpu"` (lowering from CPU) and the
    # interpreter are not tied to a device.
    gpu_is_hopper = (_target is not None or jax.default_backend() != "gpu"
                     or mgpu.is_hopper(jax.devices()[0]))
    mosaic, use_forward, use_backward = mgpu.kernels_to_use(
        block_sizes.gpu_forward, block_sizes.gpu_backward, block_sizes.mosaic, dtype=q.dtype,
        head_dim=D, sm_scale=scale,
        available=(target == "gpu" and gpu_is_hopper) or gpu_interpreter is not None)

    def padded_lengths(mosaic):
        q_blocks, kv_blocks = [bq, bqb], [bk, bkb]
        if mosaic is not None:
            q_blocks.append(mosaic.q_multiple)
            kv_blocks.append(mosaic.kv_multiple)
        if T == S:
            # Equal padded lengths keep the causal diagonal arithmetic in block units exact.
            return (_round_up(T, math.lcm(*q_blocks, *kv_blocks)),) * 2
        return _round_up(T, math.lcm(*q_blocks)), _round_up(S, math.lcm(*kv_blocks))

    T_pad, S_pad = padded_lengths(mosaic)

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
                  sm_scale=scale,
                  block_q=bq, block_kv=bk, block_q_bwd=bqb, block_kv_bwd=bkb,
                  num_warps=num_warps, num_stages=block_sizes.num_stages, target=target,
                  mosaic=mosaic,
                  mosaic_forward=mosaic is not None and use_forward,
                  mosaic_backward=mosaic is not None and use_backward,
                  mosaic_interpret=gpu_interpreter if mosaic else None)

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