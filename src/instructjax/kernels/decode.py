"""Decode attention: one new query token per sequence against a KV cache (flash-decoding).

Semantics are those of `kernels/reference.py::decode_attention_reference`: q [B, H, D],
caches [B, L, K, D], query b sees cache positions < lengths[b]; a sequence of length 0 gets 0.

Kernel: one program per (batch, kv head, split). The G = H // K query heads of a kv head are
processed together as the M dimension of both matmuls, so each K/V tile is read once for the
whole group (GQA costs no extra memory traffic). Each split owns a contiguous run of cache
blocks, walks only the blocks below the sequence's length (splits wholly past it do no
reads), and writes a float32 partial output normalised by its own softmax sum plus its float32
log-sum-exp. A small jnp epilogue merges the splits in float32 (bf16 partials would lose
precision, see /work/shared/KERNEL-ANCHORS.md).

Splitting (Dao et al., "Flash-Decoding for long-context inference", 2023): with one token per
sequence there are only B * K (batch, kv head) pairs; when that is small against the
machine's parallelism, cutting the cache into `num_splits` runs multiplies the programs. The
default is num_splits = ceil(target / (B * K)) capped by the number of cache blocks, where
target = 2 programs per GPU multiprocessor (two resident programs per SM hide memory latency),
2 per TPU core, and 1 in the CPU interpreter (where splitting only adds work).

Backends as in flash.py: the CPU interpreter, Triton on GPU (the group is padded
to 16 rows, Triton's smallest dot), Mosaic TPU (unmeasured; caches are transposed to
[B, K, L, D] for TPU tiling, a full copy per call that a heads-major cache would avoid), and
with gpu_kernel="mosaic" the Hopper kernel of decode_mgpu.py (TMA-pipelined, the
group padded to the 64 rows of a warpgroup's wgmma; same partials and combine).

Letters: B batch, H query heads, K kv heads, G = H // K, Gp G padded for the backend, L cache
length, D head dim, N splits, bk cache block.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from instructjax.kernels import flash_mgpu as mgpu

# Finite score fill for invisible cache entries (see flash.py).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# Cache rows per loop step, by backend.
_DEFAULT_BLOCK_KV = {"gpu": 64, "tpu": 128, "interpret": 128}
# Smallest M dimension of a dot: Triton needs 16, TPU works in 8-row sublanes.
_MIN_ROWS = {"gpu": 16, "tpu": 8, "interpret": 1}
# GPU multiprocessors assumed when the device does not report them (H100 SXM).
_DEFAULT_GPU_CORES = 132


def _next_power_of_2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def default_num_splits(batch, kv_heads, cache_len, block_kv, target_programs):
    """Splits along the cache so that batch * kv_heads * splits reaches target_programs.

    At least 1, and at most one split per cache block (a split must own a block).
    """
    blocks = -(-cache_len // block_kv)
    wanted = -(-target_programs // (batch * kv_heads))
    return int(max(1, min(wanted, blocks)))


def split_block_range(split, length, block_kv, blocks_per_split):
    """Cache blocks [first, last) that split `split` reads for a sequence of `length`.

    Split s owns blocks [s * blocks_per_split, (s + 1) * blocks_per_split) and reads only
    those holding a position < length: last <= first means the split reads nothing. Works
    on Python ints and traced kernel scalars (lax.div on non-negative ints).
    """
    first = split * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, lax.div(length + block_kv - 1, block_kv))
    return first, jnp.maximum(last, first)


def _target_programs(target):
    if target == "gpu":
        cores = getattr(jax.devices()[0], "core_count", None) or _DEFAULT_GPU_CORES
        return 2 * cores
    if target == "tpu":
        return 2 * (getattr(jax.devices()[0], "num_cores", None) or 1)
    return 1


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, mask_ref, o_ref, lse_ref, *, sm_scale,
                   block_kv, blocks_per_split):
    """One (b, kv head, split) program.

    Refs: lengths int32 [B] (whole); q [Gp, D]; k / v [L, D] (the whole cache row of this kv
        head: a split reads only its own visible blocks); mask int32 [1, L] (this row's
        kv_mask, a row vector so that a block of it needs no reshape); outputs o [Gp, D] float32
        (normalised within the split) and lse [Gp, 1] float32 (-inf if the split saw nothing).
    """
    b, s = pl.program_id(0), pl.program_id(2)
    bk = block_kv
    length = len_ref[b]
    first, last = split_block_range(s, length, bk, blocks_per_split)
    q = q_ref[...]
    Gp, D = q.shape

    def step(j, carry):
        m, l, acc = carry
        start = pl.multiple_of(j * bk, bk)
        # Visibility as a column (for the value rows) and as a row (for the scores).
        visible_col = start + lax.broadcasted_iota(jnp.int32, (bk, 1), 0) < length
        visible_row = ((start + lax.broadcasted_iota(jnp.int32, (1, bk), 1) < length)
                       & (mask_ref[:, pl.ds(start, bk)] != 0))
        k = k_ref[pl.ds(start, bk), :]
        # Entries past the length may hold anything (stale or uninitialised slots): zero the
        # values too, since a masked weight of 0 times a NaN would still poison the sum.
        v = jnp.where(visible_col, v_ref[pl.ds(start, bk), :], 0)
        scores = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * sm_scale
        scores = jnp.where(visible_row, scores, _MASK_VALUE)
        m_new = jnp.maximum(m, scores.max(axis=1))
        p = jnp.where(visible_row, jnp.exp(scores - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=1)
        acc = acc * alpha[:, None] + lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return m_new, l, acc

    carry = (jnp.full((Gp,), _MASK_VALUE, jnp.float32), jnp.zeros((Gp,), jnp.float32),
             jnp.zeros((Gp, D), jnp.float32))
    m, l, acc = lax.fori_loop(first, last, step, carry)
    seen = l > 0.0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = acc / l_safe[:, None]
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)[:, None]


def _hopper_decode(q, k_cache, v_cache, lengths, mask_BL, *, sm_scale, bk, blocks_per_split,
                   num_splits, interpret):
    """decode_attention through the Hopper kernel (decode_mgpu.py) on the padded
    caches, clamped lengths and int32 mask [B, L_pad]: q padded to its 64-row group tile;
    [B, H, D] in q.dtype."""
    from instructjax.kernels import decode_mgpu as dmgpu   # it imports this module
    B, H, D = q.shape
    K = k_cache.shape[2]
    G = H // K
    q_BKRD = jnp.pad(q.reshape(B, K, G, D), ((0, 0), (0, 0), (0, dmgpu.ROWS - G), (0, 0)))
    partials = functools.partial(dmgpu.decode_partials, group=G, sm_scale=float(sm_scale),
                                 block_kv=bk, blocks_per_split=blocks_per_split,
                                 num_splits=num_splits, interpret=interpret)
    o, lse = _forward_only(partials)(q_BKRD, k_cache, v_cache, lengths, mask_BL)
    return _combine(o, lse[..., None]).reshape(B, H, D).astype(q.dtype)


def _combine(o_BKNGD, lse_BKNG1):
    """Merge split partials in float32: sum_n w_n o_n / sum_n w_n with w_n = exp(lse_n)."""
    lse_max = lse_BKNG1.max(axis=2, keepdims=True)
    # All splits empty (length 0): every weight is exp(-inf) = 0 and the output is 0.
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    w_BKNG1 = jnp.exp(lse_BKNG1 - lse_max)
    denom_BKG1 = w_BKNG1.sum(axis=2)
    out_BKGD = (w_BKNG1 * o_BKNGD).sum(axis=2)
    return out_BKGD / jnp.where(denom_BKG1 > 0.0, denom_BKG1, 1.0)


def _forward_only(fn):
    """fn(*arrays) as a `jax.custom_vjp` call whose derivative is refused.

    From jax 0.11 a bare pallas_call is never removed as dead code, even when nothing uses
    its outputs. flax's nn.scan traces each layer once to find its loop invariants and
    refuses a body where anything it cannot remove depends on the scanned inputs
    ("broadcasted variable has a data dependency on the scan body"): the rollout's scanned
    decode layers failed there. A custom_vjp call whose outputs are unused is dead code
    again; decoding is never differentiated, so the backward is an error that says so.
    """
    wrapped = jax.custom_vjp(fn)

    def forward(*args):
        return fn(*args), None

    def backward(_, cotangents):
        raise NotImplementedError("decode_attention is forward only (decoding takes no "
                                  "gradients); differentiate flash_attention instead")

    wrapped.defvjp(forward, backward)
    return wrapped


def decode_attention(q, k_cache, v_cache, lengths, *, kv_mask=None, sm_scale=None,
                     num_splits=None, block_kv=None, interpret=False, gpu_kernel="triton",
                     _target=None):
    """Attention of one new token per sequence over its cache (split-K flash-decoding).

    Forward only (decoding is not differentiated).

    Args:
        q: [B, H, D] queries of the new tokens, float32 or bfloat16.
        k_cache, v_cache: [B, L, K, D] caches, same dtype as q; H a multiple of K, query head
            h reads kv head h // (H // K).
        lengths: int [B], number of valid cache entries per sequence (clamped to [0, L]).
        kv_mask: optional int or bool [B, L]; 0 hides a position below the length as well
            (the left padding of a batch of prompts in the rollout cache). Masked positions
            are still read: the kernel skips only whole blocks past the length.
        sm_scale: multiplier of q.k before the softmax; default 1/sqrt(D).
        num_splits: splits along the cache; default from `default_num_splits` (module doc).
        block_kv: cache rows per loop step (a power of two >= 16 on GPU); default by backend.
            If L is not a multiple, the caches are padded (a copy: pick a divisor of L).
        interpret: run in the Pallas interpreter (required on CPU). A Mosaic GPU
            `InterpretGPUParams` interprets the Hopper kernel when gpu_kernel="mosaic" (see
            tests/kernels/_mgpu_interpret.py).
        gpu_kernel: "triton" (default until measured against it) or "mosaic", the Hopper
            kernel of decode_mgpu.py; "mosaic" falls back to Triton off sm_90 and
            for what that kernel does not cover (float32, head dims other than 64 / 128,
            more than 64 query heads per kv head, sm_scale <= 0).
        _target: 'gpu' or 'tpu' to build that backend's kernel from any host (lowering
            checks); not for normal use.

    Returns:
        [B, H, D] in q.dtype; zeros for sequences that see no position.
    """
    B, H, D = q.shape
    L, K = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != (B, L, K, D) or v_cache.shape != (B, L, K, D):
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must both be "
                         f"[B, L, K, D] with B={B}, D={D}")
    if H % K != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K})")
    if lengths.shape != (B,):
        raise ValueError(f"lengths {lengths.shape} must be [B] = [{B}]")
    if kv_mask is not None and kv_mask.shape != (B, L):
        raise ValueError(f"kv_mask {kv_mask.shape} must be [B, L] = [{B}, {L}]")
    if _target is None:
        backend = jax.default_backend()
        if backend == "cpu" and not interpret:
            raise ValueError("decode_attention on CPU runs only in the Pallas interpreter: "
                             "pass interpret=True")
        target = "interpret" if interpret else backend
    else:
        target = _target
    if target not in ("interpret", "gpu", "tpu"):
        raise ValueError(f"no decode_attention kernel for backend {target!r}")
    G = H // K
    if sm_scale is None:
        sm_scale = D ** -0.5
    if gpu_kernel not in ("triton", "mosaic"):
        raise ValueError(f"gpu_kernel must be 'triton' or 'mosaic', got {gpu_kernel!r}")
    from instructjax.kernels import decode_mgpu as dmgpu   # it imports this module
    gpu_interpreter = interpret if type(interpret).__name__ == "InterpretGPUParams" else None
    # On a real GPU only Hopper has wgmma; a lowering from CPU (_target) builds for it.
    hopper = target == "gpu" and (_target is not None or mgpu.is_hopper(jax.devices()[0]))
    mosaic = (gpu_kernel == "mosaic" and (hopper or gpu_interpreter is not None)
              and sm_scale > 0 and dmgpu.unsupported_reason(q.dtype, D, G) is None)
    if mosaic:
        bk = block_kv or 64
        if bk % 64:
            raise ValueError(f"block_kv ({bk}) must be a multiple of 64 for the Hopper kernel")
    else:
        bk = block_kv or _DEFAULT_BLOCK_KV[target]
        bk = min(bk, max(16, _next_power_of_2(L)))
    L_pad = -(-L // bk) * bk
    n_blocks = L_pad // bk
    if num_splits is None:
        # The Hopper kernel's pipeline slots (~146 KiB at D = 128) leave room for one
        # program per multiprocessor, and its slots in flight already cover the memory
        # latency: aim for one program per multiprocessor rather than two.
        programs = _target_programs(target) // (2 if mosaic and target == "gpu" else 1)
        num_splits = default_num_splits(B, K, L, bk, programs)
    if not 1 <= num_splits:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    blocks_per_split = -(-n_blocks // num_splits)
    N = -(-n_blocks // blocks_per_split)          # splits that own at least one block

    if L_pad != L:
        pad = ((0, 0), (0, L_pad - L), (0, 0), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, pad), jnp.pad(v_cache, pad)
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, L)
    mask_BL = jnp.ones((B, L), jnp.int32) if kv_mask is None else (kv_mask != 0).astype(jnp.int32)
    mask_BL = jnp.pad(mask_BL, ((0, 0), (0, L_pad - L)))
    if mosaic:
        return _hopper_decode(q, k_cache, v_cache, lengths, mask_BL, sm_scale=sm_scale, bk=bk,
                              blocks_per_split=blocks_per_split, num_splits=N,
                              interpret=gpu_interpreter)
    Gp = max(G, _MIN_ROWS[target])
    q_BKGD = q.reshape(B, K, G, D)
    if Gp != G:
        q_BKGD = jnp.pad(q_BKGD, ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    mask_B1L = mask_BL[:, None]

    if target == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        k_cache, v_cache = k_cache.transpose(0, 2, 1, 3), v_cache.transpose(0, 2, 1, 3)
        kv_spec = pl.BlockSpec((None, None, L_pad, D), lambda b, h, s: (b, h, 0, 0))
        len_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
        params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
    else:
        kv_spec = pl.BlockSpec((None, L_pad, None, D), lambda b, h, s: (b, 0, h, 0))
        len_spec = pl.BlockSpec()
        params = None
        if target == "gpu":
            from jax.experimental.pallas import triton as plt
            params = plt.CompilerParams(num_warps=4, num_stages=2)

    kernel_call = pl.pallas_call(
        functools.partial(_decode_kernel, sm_scale=float(sm_scale), block_kv=bk,
                          blocks_per_split=blocks_per_split),
        grid=(B, K, N),
        in_specs=[len_spec,
                  pl.BlockSpec((None, None, Gp, D), lambda b, h, s: (b, h, 0, 0)),
                  kv_spec, kv_spec,
                  pl.BlockSpec((None, 1, L_pad), lambda b, h, s: (b, 0, 0))],
        out_specs=[pl.BlockSpec((None, None, None, Gp, D), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, Gp, 1), lambda b, h, s: (b, h, s, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, K, N, Gp, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, N, Gp, 1), jnp.float32)],
        compiler_params=params,
        interpret=target == "interpret",
        name="decode_attention",
    )
    o, lse = _forward_only(kernel_call)(lengths, q_BKGD, k_cache, v_cache, mask_B1L)
    out_BKGD = _combine(o, lse)[:, :, :G]
    return out_BKGD.reshape(B, H, D).astype(q.dtype)
