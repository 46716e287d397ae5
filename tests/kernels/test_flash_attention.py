"""kernels/flash.py (and its block_sparsity.py) in Pallas interpret mode against
kernels/reference.py.

Forward output, log-sum-exp and q/k/v gradients (jax.vjp with random cotangents) are compared
with the plain-jnp reference on fresh random inputs; the block-skipping tables are checked
against a brute-force mask, and NaN-poisoned blocks prove the kernels skip exactly the blocks
the tables call SKIP. The GPU (Triton) and TPU (Mosaic) kernels are lowered, not run.
"""
import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _lowering import lowered_text
from instructjax.kernels import block_sparsity as bsp
from instructjax.kernels import flash as fa
from instructjax.kernels import reference

# Relative norm errors. float32: the kernel and the reference differ only in summation
# order (online vs two-pass softmax, blocked matmuls): ~1e-7 here, and a wrong mask, scale
# or head mapping gives O(0.1). bf16 inputs vs the float32 reference on the same (rounded)
# values: the kernel rounds p and dS to bf16 before its matmuls and the output to bf16,
# ~4e-3 relative each.
F32_TOL = 1e-5
BF16_TOL = 1e-2

# XLA's CPU backend at optimisation level 0 compiles the interpreted kernels (long loop
# bodies) 2-3x faster; the numerics are unchanged (no fast-math at any level).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def normal(key, shape, dtype=jnp.float32):
    # Drawn flat and reshaped: XLA on this CPU compiles rank-4 threefry slowly.
    return jax.random.normal(key, (int(np.prod(shape)),), jnp.float32).reshape(shape).astype(dtype)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm((x - ref).ravel()) / np.linalg.norm(ref.ravel()))


def packed_segment_ids(B, T, seed):
    """int32 [B, T] of packed documents with padding (id 0).

    Even rows pack random-length documents and end with T // 8 padding tokens; odd rows
    start with T // 2 padding tokens (whole padding blocks: rows that see nothing) and pack
    documents after them.
    """
    rng = np.random.default_rng(seed)
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        pos, end = (0, T - T // 8) if b % 2 == 0 else (T // 2, T)
        doc = 1
        while pos < end:
            n = int(rng.integers(3, max(4, T // 3)))
            ids[b, pos:min(pos + n, end)] = doc
            pos, doc = pos + n, doc + 1
    return jnp.asarray(ids)


def reference_lse(q, k, segment_ids, causal):
    """float32 [B, H, T] log-sum-exp of the scaled visible scores, -inf for empty rows."""
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    scores = jnp.einsum("btkgd,bskd->bkgts", q.reshape(B, T, K, G, D).astype(jnp.float32),
                        k.astype(jnp.float32)) * D ** -0.5
    if segment_ids is not None:
        mask = reference.make_attention_mask(segment_ids, segment_ids, causal)
    elif causal:
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, S), bool)), (B, T, S))
    else:
        mask = jnp.ones((B, T, S), bool)
    mask = mask[:, None, None]
    lse = jax.nn.logsumexp(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    lse = jnp.where(mask.any(-1), lse, -jnp.inf)
    return lse.reshape(B, H, T)


@functools.partial(jax.jit, static_argnames=("causal", "block_sizes", "interpret"),
                   compiler_options=FAST_COMPILE)
def kernel_vjp(q, k, v, segment_ids, do, dlse, *, causal, block_sizes, interpret=True):
    fn = lambda q, k, v: fa.flash_attention(q, k, v, segment_ids=segment_ids, causal=causal,
                                            block_sizes=block_sizes, interpret=interpret,
                                            return_lse=True)
    (o, lse), vjp = jax.vjp(fn, q, k, v)
    return o, lse, vjp((do, dlse))


@functools.partial(jax.jit, static_argnames=("causal",), compiler_options=FAST_COMPILE)
def reference_vjp(q, k, v, segment_ids, do, dlse, *, causal):
    fn = lambda q, k, v: (reference.attention(q, k, v, segment_ids=segment_ids, causal=causal),
                          reference_lse(q, k, segment_ids, causal))
    (o, lse), vjp = jax.vjp(fn, q, k, v)
    return o, lse, vjp((do, dlse))


BS32 = fa.BlockSizes(32, 32, 32, 32)

# (causal, segments, G, D, T, S, block sizes, dtype): pairwise coverage of the options.
CASES = [
    (True, False, 1, 64, 64, 64, BS32, jnp.float32),
    (True, False, 2, 128, 77, 77, BS32, jnp.float32),        # odd length, causal padding
    (False, False, 4, 64, 77, 77, BS32, jnp.float32),        # odd length, masked key padding
    (True, True, 2, 64, 77, 77, BS32, jnp.float32),
    (False, True, 4, 128, 96, 96, BS32, jnp.float32),
    (True, True, 1, 128, 160, 160, fa.BlockSizes(64, 32, 32, 64), jnp.float32),
    (False, False, 2, 64, 48, 80, BS32, jnp.float32),        # cross attention, T != S
    (True, True, 2, 64, 77, 77, BS32, jnp.bfloat16),
    (False, False, 4, 128, 64, 64, BS32, jnp.bfloat16),
]


@pytest.mark.parametrize("causal,segments,G,D,T,S,block_sizes,dtype", CASES)
def test_matches_reference(causal, segments, G, D, T, S, block_sizes, dtype):
    check_against_reference(causal, segments, G, D, T, S, block_sizes, dtype, interpret=True)


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"),
                    reason="compiled kernels need a GPU or TPU (CPU runs the interpreter)")
@pytest.mark.parametrize("causal,segments,G,D,T", [(True, True, 4, 128, 300),
                                                   (True, False, 2, 64, 256),
                                                   (False, False, 1, 128, 200)])
def test_compiled_kernels_match_reference(causal, segments, G, D, T):
    """On an accelerator: the Triton / Mosaic kernels with default blocks, bf16 inputs."""
    check_against_reference(causal, segments, G, D, T, T, None, jnp.bfloat16,
                            interpret=False)


def check_against_reference(causal, segments, G, D, T, S, block_sizes, dtype, interpret):
    B, K = 2, 2
    H = G * K
    seed = hash((causal, segments, G, D, T, S)) % 2**31
    kq, kk, kv, kdo, kdl = jax.random.split(jax.random.key(seed), 5)
    q = normal(kq, (B, T, H, D), dtype)
    k = normal(kk, (B, S, K, D), dtype)
    v = normal(kv, (B, S, K, D), dtype)
    do = normal(kdo, (B, T, H, D), dtype)
    dlse = normal(kdl, (B, H, T))
    seg = packed_segment_ids(B, T, seed) if segments else None

    o, lse, grads = kernel_vjp(q, k, v, seg, do, dlse, causal=causal, block_sizes=block_sizes,
                               interpret=interpret)
    f32 = lambda x: x.astype(jnp.float32)
    ro, rlse, rgrads = reference_vjp(f32(q), f32(k), f32(v), seg, f32(do), dlse, causal=causal)

    chex.assert_trees_all_equal_shapes_and_dtypes((o, grads), (q, (q, k, v)))
    tol = F32_TOL if dtype == jnp.float32 else BF16_TOL
    assert rel_err(o, ro) <= tol
    for name, g, rg in zip("qkv", grads, rgrads):
        assert np.isfinite(np.asarray(g, np.float32)).all(), f"d{name} has NaN/inf"
        assert rel_err(g, rg) <= tol, f"d{name}"
    empty = np.isneginf(np.asarray(rlse))
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty)
    assert rel_err(np.where(empty, 0, lse), np.where(empty, 0, rlse)) <= tol
    if segments:
        # Padding tokens see nothing and are seen by nobody: exactly zero output and zero
        # gradients for their queries, keys and values.
        pad_BT = np.asarray(seg) == 0
        assert pad_BT.any() and empty.any()
        assert (np.asarray(o, np.float32)[pad_BT] == 0).all()
        for g in grads:
            assert (np.asarray(g, np.float32)[pad_BT] == 0).all()


def test_default_block_sizes_and_model_entry_point():
    """No block_sizes, no return_lse: the call the model's attention_impl='pallas' makes."""
    B, T, H, K, D = 1, 40, 4, 1, 64
    kq, kk, kv = jax.random.split(jax.random.key(7), 3)
    q, k, v = normal(kq, (B, T, H, D)), normal(kk, (B, T, K, D)), normal(kv, (B, T, K, D))
    o = jax.jit(functools.partial(fa.flash_attention, interpret=True),
                compiler_options=FAST_COMPILE)(q, k, v)
    assert rel_err(o, reference.attention(q, k, v)) <= F32_TOL
    if jax.default_backend() == "cpu":       # no compiled Pallas kernels on CPU
        with pytest.raises(ValueError, match="interpret=True"):
            fa.flash_attention(q, k, v)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        fa.flash_attention(q[:, :, :3], k[:, :, :1].repeat(2, axis=2),
                           v[:, :, :1].repeat(2, axis=2), interpret=True)


# --------------------------------------------------------------------------------------
# Block skipping
# --------------------------------------------------------------------------------------

kind_table = jax.jit(bsp.block_kind_table, static_argnums=(2, 3), static_argnames=("causal",))


def brute_force_kinds(seg, bq, bk, causal):
    """SKIP / FULL / MASKED per block pair from the dense [B, T, S] mask."""
    mask = np.asarray(reference.make_attention_mask(seg, seg, causal))
    B, T, S = mask.shape
    blocks = mask.reshape(B, T // bq, bq, S // bk, bk)
    any_ = blocks.any(axis=(2, 4))
    all_ = blocks.all(axis=(2, 4))
    return np.where(~any_, bsp.SKIP, np.where(all_, bsp.FULL, bsp.MASKED))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("layout", ["packed", "random", "one_doc"])
def test_block_kind_table_matches_brute_force(causal, layout):
    B, T = 2, 128
    rng = np.random.default_rng(3)
    if layout == "packed":
        seg = packed_segment_ids(B, T, 5)
    elif layout == "random":
        seg = jnp.asarray(rng.integers(0, 4, (B, T)), jnp.int32)   # unsorted ids
    else:
        seg = jnp.ones((B, T), jnp.int32)
    for bq, bk in [(16, 16), (32, 16), (16, 64), (64, 32)]:
        kinds = np.asarray(kind_table(seg, seg, bq, bk, causal=causal))
        exact = brute_force_kinds(seg, bq, bk, causal)
        # SKIP must be exact whenever the ranges prove it; it may only err towards MASKED
        # (min/max ranges of unsorted ids can overlap without sharing an id).
        assert ((kinds == bsp.SKIP) <= (exact == bsp.SKIP)).all()
        assert ((kinds == bsp.FULL) == (exact == bsp.FULL)).all()
        if layout != "random":
            np.testing.assert_array_equal(kinds, exact)
        lo, hi = (np.asarray(x) for x in jax.jit(bsp.visit_ranges)(kinds))
        cols = np.arange(kinds.shape[-1])
        outside = (cols < lo[..., None]) | (cols >= hi[..., None])
        assert (kinds[outside] == bsp.SKIP).all()


def test_causal_block_ranges_match_brute_force():
    T = 192
    seg = jnp.ones((1, T), jnp.int32)
    for bq, bk in [(16, 16), (32, 16), (16, 64), (64, 32), (48, 16)]:
        exact = brute_force_kinds(seg, bq, bk, True)[0]            # [nq, nk]
        for rows_are_queries, table in [(True, exact), (False, exact.T)]:
            rb, cb = (bq, bk) if rows_are_queries else (bk, bq)
            for r in range(table.shape[0]):
                got = np.full(table.shape[1], bsp.SKIP)
                for start, stop, masked in bsp.causal_block_ranges(
                        r, rb, cb, table.shape[1], rows_are_queries=rows_are_queries):
                    got[int(start):int(stop)] = bsp.MASKED if masked else bsp.FULL
                np.testing.assert_array_equal(got, table[r], err_msg=f"{bq},{bk},{r}")


@pytest.mark.parametrize("segments", [True, False])
def test_kernels_skip_exactly_the_skip_blocks(segments):
    """NaN in one block of K/V (or Q) reaches exactly the blocks that visit it.

    A visited block, masked or not, turns NaN inputs into NaN outputs (0 * NaN in the
    matmul), so finite rows prove a block was skipped and NaN rows that it was visited.
    """
    B, T, H, K, D, b = 2, 128, 2, 1, 64, 32
    bs = fa.BlockSizes(b, b, b, b)
    seg = packed_segment_ids(B, T, 11) if segments else None
    kinds = brute_force_kinds(seg if segments else jnp.ones((B, T), jnp.int32), b, b, True)
    if segments:
        np.testing.assert_array_equal(
            np.asarray(kind_table(seg, seg, b, b, causal=True)), kinds)
    assert (kinds == bsp.SKIP).any() and (kinds != bsp.SKIP).any()
    kq, kk, kv, kdo = jax.random.split(jax.random.key(2), 4)
    q, k, v = normal(kq, (B, T, H, D)), normal(kk, (B, T, K, D)), normal(kv, (B, T, K, D))
    do, dlse = normal(kdo, (B, T, H, D)), jnp.zeros((B, H, T))
    n = T // b
    blocks_nan = lambda x: np.isnan(np.asarray(x)).reshape(B, n, -1).any(-1)   # [B, n]

    j = n // 2                                         # poison kv block j
    k_bad = k.at[:, j * b:(j + 1) * b].set(jnp.nan)
    v_bad = v.at[:, j * b:(j + 1) * b].set(jnp.nan)
    o, _, (dq, _, _) = kernel_vjp(q, k_bad, v_bad, seg, do, dlse, causal=True, block_sizes=bs)
    visits_j = kinds[:, :, j] != bsp.SKIP               # [B, nq]
    np.testing.assert_array_equal(blocks_nan(o), visits_j)
    np.testing.assert_array_equal(blocks_nan(dq), visits_j)

    i = 1                                              # poison query block i
    q_bad = q.at[:, i * b:(i + 1) * b].set(jnp.nan)
    _, _, (_, dk, dv) = kernel_vjp(q_bad, k, v, seg, do, dlse, causal=True, block_sizes=bs)
    visited_by_i = kinds[:, i, :] != bsp.SKIP           # [B, nk]
    np.testing.assert_array_equal(blocks_nan(dk), visited_by_i)
    np.testing.assert_array_equal(blocks_nan(dv), visited_by_i)


# --------------------------------------------------------------------------------------
# GPU / TPU kernels: lowered from CPU (Triton IR / Mosaic), never run here
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("target,platform,call", [("gpu", "cuda", "__gpu$xla.gpu.triton"),
                                                  ("tpu", "tpu", "tpu_custom_call")])
@pytest.mark.parametrize("causal,segments,dtype", [(True, True, jnp.bfloat16),
                                                   (False, False, jnp.float32)])
def test_lowers_for_accelerators(target, platform, call, causal, segments, dtype):
    B, T, H, K, D = 2, 300, 8, 2, 128
    q = jnp.zeros((B, T, H, D), dtype)
    k = jnp.zeros((B, T, K, D), dtype)
    seg = jnp.ones((B, T), jnp.int32) if segments else None

    def fwd_bwd(q, k, v, seg):
        fn = lambda q, k, v: fa.flash_attention(q, k, v, segment_ids=seg, causal=causal,
                                                _target=target)
        o, vjp = jax.vjp(fn, q, k, v)
        return o, vjp(o)

    text = lowered_text(fwd_bwd, q, k, k, seg, platform=platform)
    assert re.findall(r"custom_call @([\w$.]+)", text).count(call) == 3   # fwd, dq, dkdv
