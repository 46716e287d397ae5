"""kernels/decode.py in Pallas interpret mode against
kernels/reference.py::decode_attention_reference, on ragged lengths (0, 1, L, split
boundaries), with and without cache splits, GQA 1/2/4, float32 and bf16."""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _lowering import lowered_text
from instructjax.kernels import decode as da
from instructjax.kernels import reference

# Relative norm errors: float32 differs from the reference only in summation order (split
# partials, online softmax); bf16 inputs against the float32 reference on the same values
# round p to bf16 before the value matmul and the output to bf16 (~4e-3).
F32_TOL = 1e-5
BF16_TOL = 1e-2
# XLA CPU optimisation level 0: 2-3x faster compiles of the interpreted kernel, same numerics.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def normal(key, shape, dtype=jnp.float32):
    # Drawn flat and reshaped: XLA on this CPU compiles rank-4 threefry slowly.
    return jax.random.normal(key, (int(np.prod(shape)),), jnp.float32).reshape(shape).astype(dtype)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm((x - ref).ravel()) / np.linalg.norm(ref.ravel()))


@functools.partial(jax.jit, static_argnames=("num_splits", "block_kv", "interpret"),
                   compiler_options=FAST_COMPILE)
def kernel(q, k, v, lengths, *, num_splits, block_kv, interpret=True):
    return da.decode_attention(q, k, v, lengths, num_splits=num_splits, block_kv=block_kv,
                               interpret=interpret)


reference_fn = jax.jit(reference.decode_attention_reference)


# (G, D, L, block_kv, num_splits, dtype). L = 200 with block 32 is not a block multiple
# (the cache is padded); with 3 splits of 3 blocks (96 rows) the lengths 96 and 192 end
# exactly on split boundaries, and 200 needs the last, partly padded block.
CASES = [
    (1, 64, 200, 32, 1, jnp.float32),
    (2, 128, 200, 32, 3, jnp.float32),
    (4, 64, 256, 64, 4, jnp.float32),
    (4, 128, 200, 32, 7, jnp.float32),      # more splits than some sequences have blocks
    (2, 64, 200, 32, 3, jnp.bfloat16),
]
LENGTHS = [0, 1, 96, 137, 192, "L"]


@pytest.mark.parametrize("G,D,L,block_kv,num_splits,dtype", CASES)
def test_matches_reference(G, D, L, block_kv, num_splits, dtype):
    B, K = len(LENGTHS), 2
    H = G * K
    lengths = jnp.array([L if n == "L" else min(n, L) for n in LENGTHS], jnp.int32)
    kq, kk, kv = jax.random.split(jax.random.key(G * 1000 + D + num_splits), 3)
    q = normal(kq, (B, H, D), dtype)
    k = normal(kk, (B, L, K, D), dtype)
    v = normal(kv, (B, L, K, D), dtype)

    out = kernel(q, k, v, lengths, num_splits=num_splits, block_kv=block_kv)
    f32 = lambda x: x.astype(jnp.float32)
    ref = reference_fn(f32(q), f32(k), f32(v), lengths)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_err(out, ref) <= (F32_TOL if dtype == jnp.float32 else BF16_TOL)
    assert (np.asarray(out[0], np.float32) == 0).all()          # length 0 -> zeros

    # Cache entries at or past a sequence's length are never used: NaN there changes nothing.
    if dtype == jnp.float32:
        stale = (jnp.arange(L)[None, :] >= lengths[:, None])[:, :, None, None]
        poisoned = kernel(q, jnp.where(stale, jnp.nan, k), jnp.where(stale, jnp.nan, v),
                          lengths, num_splits=num_splits, block_kv=block_kv)
        np.testing.assert_array_equal(np.asarray(poisoned), np.asarray(out))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_kv_mask_hides_left_padding(num_splits):
    """Left-padded rows (the rollout cache): positions with kv_mask 0 are invisible.

    Checked against a float64 numpy softmax over exactly the visible positions of each row.
    """
    B, K, G, D, L = 5, 2, 2, 64, 100
    H = G * K
    starts = np.array([0, 3, 40, 99, 60])
    lengths = np.array([100, 77, 41, 100, 60])     # the last row sees nothing
    kq, kk, kv = jax.random.split(jax.random.key(7), 3)
    q, k, v = normal(kq, (B, H, D)), normal(kk, (B, L, K, D)), normal(kv, (B, L, K, D))
    kv_mask = np.arange(L)[None, :] >= starts[:, None]
    out = da.decode_attention(q, k, v, jnp.asarray(lengths), kv_mask=jnp.asarray(kv_mask),
                              num_splits=num_splits, block_kv=32, interpret=True)
    ref = reference_fn(q, k, v, jnp.asarray(lengths), kv_mask=jnp.asarray(kv_mask))
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    expected = np.zeros((B, H, D))
    for b in range(B):
        seen = slice(starts[b], lengths[b])
        for h in range(H):
            scores = kn[b, seen, h // G] @ qn[b, h] / np.sqrt(D)
            if scores.size:
                w = np.exp(scores - scores.max())
                expected[b, h] = (w / w.sum()) @ vn[b, seen, h // G]
    assert rel_err(ref, expected) <= F32_TOL
    assert rel_err(out, expected) <= F32_TOL
    assert (np.asarray(out[4]) == 0).all()
    with pytest.raises(ValueError, match="kv_mask"):
        da.decode_attention(q, k, v, jnp.asarray(lengths), kv_mask=jnp.ones((B, L - 1)),
                            interpret=True)


@pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"),
                    reason="compiled kernels need a GPU or TPU (CPU runs the interpreter)")
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_compiled_kernel_matches_reference(num_splits):
    """On an accelerator: the Triton / Mosaic kernel, bf16, default and explicit splits."""
    B, L, H, K, D = 6, 1000, 8, 2, 128
    kq, kk, kv = jax.random.split(jax.random.key(num_splits or 0), 3)
    q = normal(kq, (B, H, D), jnp.bfloat16)
    k = normal(kk, (B, L, K, D), jnp.bfloat16)
    v = normal(kv, (B, L, K, D), jnp.bfloat16)
    lengths = jnp.array([0, 1, 64, 500, 999, 1000], jnp.int32)
    out = kernel(q, k, v, lengths, num_splits=num_splits, block_kv=None, interpret=False)
    ref = reference_fn(*(x.astype(jnp.float32) for x in (q, k, v)), lengths)
    assert rel_err(out, ref) <= BF16_TOL
    assert (np.asarray(out[0], np.float32) == 0).all()


def test_default_splits_and_block():
    """Defaults (the model's call): one split in the interpreter, default block."""
    B, L, H, K, D = 2, 48, 4, 2, 64
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q, k, v = normal(kq, (B, H, D)), normal(kk, (B, L, K, D)), normal(kv, (B, L, K, D))
    lengths = jnp.array([5, 48], jnp.int32)
    out = jax.jit(functools.partial(da.decode_attention, interpret=True),
                  compiler_options=FAST_COMPILE)(q, k, v, lengths)
    assert rel_err(out, reference_fn(q, k, v, lengths)) <= F32_TOL
    if jax.default_backend() == "cpu":       # no compiled Pallas kernels on CPU
        with pytest.raises(ValueError, match="interpret=True"):
            da.decode_attention(q, k, v, lengths)


def test_splits_read_exactly_the_blocks_below_the_length():
    """The kernel's loop bounds: every block holding a visible position is read by exactly
    one split, and no block at or past the length is read."""
    bk, n_blocks = 16, 10
    for blocks_per_split in (1, 3, 4, 10):
        n_splits = -(-n_blocks // blocks_per_split)
        for length in range(n_blocks * bk + 1):
            reads = np.zeros(n_blocks, int)
            for s in range(n_splits):
                first, last = (int(x) for x in da.split_block_range(s, length, bk,
                                                                     blocks_per_split))
                assert s * blocks_per_split <= first and last <= (s + 1) * blocks_per_split
                reads[first:last] += 1
            needed = np.arange(n_blocks) * bk < length
            np.testing.assert_array_equal(reads, needed.astype(int))


def test_default_num_splits_heuristic():
    # Few (batch, kv head) pairs: split until ~target programs, at most one split per block.
    assert da.default_num_splits(1, 8, 4096, 64, 264) == 33
    assert da.default_num_splits(1, 1, 256, 64, 264) == 4
    # Enough pairs already: no split.
    assert da.default_num_splits(64, 8, 4096, 64, 264) == 1
    assert da.default_num_splits(4, 2, 100, 64, 1) == 1


@pytest.mark.parametrize("target,platform,call", [("gpu", "cuda", "__gpu$xla.gpu.triton"),
                                                  ("tpu", "tpu", "tpu_custom_call")])
def test_lowers_for_accelerators(target, platform, call):
    B, L, H, K, D = 4, 1000, 8, 2, 128
    q = jnp.zeros((B, H, D), jnp.bfloat16)
    k = jnp.zeros((B, L, K, D), jnp.bfloat16)
    lengths = jnp.array([0, 1, 500, 1000], jnp.int32)
    fn = functools.partial(da.decode_attention, num_splits=4, _target=target)
    text = lowered_text(fn, q, k, k, lengths, platform=platform)
    assert re.findall(r"custom_call @([\w$.]+)", text).count(call) == 1


def test_gradient_is_refused_and_it_runs_inside_flax_scan():
    """Decoding is forward only: a gradient through it is a clear error. And it runs in a
    flax nn.scan over layers (the rollout's scanned decode layers): nn.scan traces a layer
    to find its loop invariants and needs an unused call to be dead code, which a bare
    pallas_call is not from jax 0.11."""
    q = jnp.ones((2, 4, 8))
    lengths = jnp.array([3, 19], jnp.int32)
    decode = functools.partial(da.decode_attention, lengths=lengths, interpret=True)
    k = normal(jax.random.key(0), (2, 19, 2, 8), jnp.float32)
    with pytest.raises(NotImplementedError, match="forward only"):
        jax.grad(lambda q: decode(q, k, k).sum())(q)

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, kv):
            return x + decode(x, kv, kv), None

    layers = nn.scan(Layer, in_axes=0, length=3)()
    kv = normal(jax.random.key(1), (3, 2, 19, 2, 8), jnp.float32)
    x, _ = layers.apply({}, q, kv)
    for layer in range(3):
        q = q + reference.decode_attention_reference(q, kv[layer], kv[layer], lengths)
    np.testing.assert_allclose(x, q, rtol=1e-5, atol=1e-5)
