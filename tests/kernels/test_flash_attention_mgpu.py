"""kernels/flash_mgpu*.py: the Hopper (Mosaic GPU) flash-attention kernels.

On CPU the kernels run in jax's Mosaic GPU interpreter (three warpgroups as threads, TMA
copies and mbarriers simulated) extended by `_mgpu_interpret.py`, and are compared with the
float32 plain-jnp reference: forward output and log-sum-exp, the backward's q/k/v gradients
(given the reference LSE and delta), and the whole flash_attention wrapper with Mosaic
kernels, alone and mixed with the Triton-formulation ones. The compiled kernels are lowered
for CUDA from CPU; running them needs a Hopper GPU (the compiled test at the end).
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _mgpu_interpret import extended_gpu_interpreter, races_found
from _lowering import lowered_text
from instructjax.kernels import flash as fa
from instructjax.kernels import flash_mgpu as mgpu
from instructjax.kernels import flash_mgpu_bwd as mgpu_bwd
from instructjax.kernels import reference

# bf16 / f16 inputs against float32 on the same rounded values: P is rounded to 16 bits
# before the P V matmul and the output is rounded on store (~4e-3 relative). The LSE is
# accumulated in float32 throughout.
HALF_TOL = 1e-2
LSE_TOL = 1e-4


def normal(key, shape, dtype):
    return jax.random.normal(key, (int(np.prod(shape)),), jnp.float32).reshape(shape).astype(dtype)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm((x - ref).ravel()) / np.linalg.norm(ref.ravel()))


def assert_matches_reference(o, grads, q, k, v, do, **attention_args):
    """o and the q/k/v gradients (cotangent do) against float32 reference.attention on the
    same bf16 values: finite, and within HALF_TOL relative error."""
    f32 = lambda x: x.astype(jnp.float32)
    ref_o, ref_vjp = jax.vjp(lambda q, k, v: reference.attention(q, k, v, **attention_args),
                             f32(q), f32(k), f32(v))
    assert rel_err(o, ref_o) < HALF_TOL
    for name, g, ref_g in zip("qkv", grads, ref_vjp(f32(do))):
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        assert rel_err(g, ref_g) < HALF_TOL, name


def qkv(seed, B, T, H, K, D, dtype):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (normal(ks[0], (B, T, H, D), dtype), normal(ks[1], (B, T, K, D), dtype),
            normal(ks[2], (B, T, K, D), dtype))


def reference_lse(q, k, causal, sm_scale):
    """float32 [B, H, T] log-sum-exp of the scaled (masked) scores."""
    G = q.shape[2] // k.shape[2]
    kf = jnp.repeat(k.astype(jnp.float32), G, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kf) * sm_scale
    if causal:
        T = q.shape[1]
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    return jax.nn.logsumexp(s, axis=-1)


# (causal, T, H, K, D, block_kv, dtype): one program and several; kv blocks smaller than,
# equal to and larger than a warpgroup's 64 rows; more kv steps than pipeline slots (the
# producer's refill loop); GQA 1, 2 and 4; head dims 64 and 128; a causal tile whose first
# warpgroup stops early (its epilogue releases the other warpgroup's blocks).
# (causal, T, H, K, D, block_kv, stages, dtype)
FORWARD_CASES = [
    (False, 128, 1, 1, 64, 64, 2, jnp.bfloat16),
    (True, 256, 2, 1, 64, 64, 2, jnp.bfloat16),
    (False, 256, 2, 1, 128, 64, 3, jnp.float16),
    pytest.param(True, 256, 4, 1, 128, 128, 2, jnp.bfloat16, marks=pytest.mark.slow),
    pytest.param(True, 384, 2, 2, 64, 64, 3, jnp.bfloat16, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("causal,T,H,K,D,block_kv,stages,dtype", FORWARD_CASES)
def test_forward_matches_reference(causal, T, H, K, D, block_kv, stages, dtype):
    q, k, v = qkv(T + D + H, 1, T, H, K, D, dtype)
    sm_scale = 0.7 / D ** 0.5
    blocks = mgpu.MosaicBlocks(block_q=64, block_kv=block_kv, num_stages=stages)
    with extended_gpu_interpreter() as interpret:
        o, lse = mgpu.flash_forward(q, k, v, causal=causal, sm_scale=sm_scale, blocks=blocks,
                                    interpret=interpret)
        jax.block_until_ready(o)
    assert not races_found()
    assert o.shape == q.shape and o.dtype == dtype
    assert lse.shape == (1, H, T) and lse.dtype == jnp.float32
    f32 = lambda x: x.astype(jnp.float32)
    ref = reference.attention(f32(q), f32(k), f32(v), causal=causal, sm_scale=sm_scale)
    assert rel_err(o, ref) < HALF_TOL
    np.testing.assert_allclose(lse, reference_lse(q, k, causal, sm_scale), atol=LSE_TOL)


def reference_lse_segments(q, k, seg, causal, sm_scale):
    """float32 [B, H, T] log-sum-exp over the keys of each query's own (non-zero) segment;
    -inf for rows that see nothing."""
    G = q.shape[2] // k.shape[2]
    kf = jnp.repeat(k.astype(jnp.float32), G, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kf) * sm_scale
    visible = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    if causal:
        visible = visible & jnp.tril(jnp.ones(visible.shape[1:], bool))
    return jax.nn.logsumexp(jnp.where(visible[:, None], s, -jnp.inf), axis=-1)


# Packed rows: documents that cross program and block boundaries, a tail of padding (rows
# that see nothing: output 0, LSE -inf), one document over the whole row, and unsorted ids
# (a block range that overlaps without sharing an id: SKIP found inside [lo, hi)).
SEGMENT_ROWS = [[1] * 50 + [2] * 100 + [3] * 60 + [0] * 46,
                [7] * 256,
                [5] * 64 + [2] * 64 + [5] * 64 + [0] * 64]


@pytest.mark.parametrize("causal,block_kv,K", [(True, 64, 1), (False, 128, 2)])
def test_forward_with_segments_matches_reference(causal, block_kv, K):
    H, D, T, dtype = 2, 64, 256, jnp.bfloat16
    q, k, v = qkv(block_kv + K, len(SEGMENT_ROWS), T, H, K, D, dtype)
    seg = jnp.asarray(SEGMENT_ROWS, jnp.int32)
    sm_scale = 0.7 / D ** 0.5
    blocks = mgpu.MosaicBlocks(block_q=64, block_kv=block_kv, num_stages=2)
    with extended_gpu_interpreter() as interpret:
        o, lse = mgpu.flash_forward(q, k, v, causal=causal, sm_scale=sm_scale, blocks=blocks,
                                    q_seg=seg, kv_seg=seg, interpret=interpret)
        jax.block_until_ready(o)
    assert not races_found()
    f32 = lambda x: x.astype(jnp.float32)
    ref = reference.attention(f32(q), f32(k), f32(v), segment_ids=seg, causal=causal,
                              sm_scale=sm_scale)
    o = np.asarray(o, np.float32)
    assert np.isfinite(o).all() and not o[np.asarray(seg) == 0].any()
    assert rel_err(o, ref) < HALF_TOL
    np.testing.assert_allclose(lse, reference_lse_segments(q, k, seg, causal, sm_scale),
                               atol=LSE_TOL)


@pytest.mark.parametrize("causal,K,bwd_block_kv", [
    (True, 1, 64),
    pytest.param(False, 1, 64, marks=pytest.mark.slow),
    pytest.param(True, 2, 128, marks=pytest.mark.slow),
])
def test_backward_with_segments_matches_reference(causal, K, bwd_block_kv):
    """dQ and dK/dV on packed rows (given the reference LSE, -inf on padding rows, and
    delta): gradients match and padding rows get exactly zero, never NaN."""
    H, D, T, dtype = 2 * K, 64, 256, jnp.bfloat16
    q, k, v = qkv(7 + K, len(SEGMENT_ROWS), T, H, K, D, dtype)
    do = normal(jax.random.key(8), q.shape, dtype)
    seg = jnp.asarray(SEGMENT_ROWS, jnp.int32)
    sm_scale = 0.7 / D ** 0.5
    f32 = lambda x: x.astype(jnp.float32)
    o, ref_vjp = jax.vjp(lambda q, k, v: reference.attention(
        q, k, v, segment_ids=seg, causal=causal, sm_scale=sm_scale), f32(q), f32(k), f32(v))
    lse = reference_lse_segments(q, k, seg, causal, sm_scale)
    delta = jnp.einsum("bthd,bthd->bht", o, f32(do))
    blocks = mgpu.MosaicBlocks(block_kv=64, bwd_block_q=64, bwd_block_kv=bwd_block_kv)
    with extended_gpu_interpreter() as interpret:
        grads = mgpu_bwd.flash_backward(q, k, v, do, lse, delta, causal=causal,
                                        sm_scale=sm_scale, blocks=blocks, q_seg=seg,
                                        kv_seg=seg, interpret=interpret)
        jax.block_until_ready(grads)
    assert not races_found()
    for name, g, ref_g in zip("qkv", grads, ref_vjp(f32(do))):
        g = np.asarray(g, np.float32)
        assert np.isfinite(g).all(), name
        assert rel_err(g, ref_g) < HALF_TOL, name
    assert not np.asarray(grads[0], np.float32)[np.asarray(seg) == 0].any()


# (causal, T, H, K, D, bwd_block_q, bwd_block_kv): one tile and several; GQA 1, 2 and 4;
# head dims 64 and 128; causal dK/dV tiles whose second warpgroup skips whole blocks and dQ
# tiles whose first warpgroup stops early; query and key blocks of different sizes.
BACKWARD_CASES = [
    (False, 128, 1, 1, 64, 64, 64),
    (True, 256, 2, 1, 64, 64, 64),
    (True, 256, 2, 2, 64, 64, 128),
    pytest.param(True, 256, 4, 2, 128, 64, 64, marks=pytest.mark.slow),
    pytest.param(False, 256, 4, 1, 128, 64, 64, marks=pytest.mark.slow),
    pytest.param(True, 256, 2, 1, 64, 128, 64, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("causal,T,H,K,D,bwd_block_q,bwd_block_kv", BACKWARD_CASES)
def test_backward_matches_reference(causal, T, H, K, D, bwd_block_q, bwd_block_kv):
    dtype = jnp.bfloat16
    q, k, v = qkv(T + D + H + 1, 1, T, H, K, D, dtype)
    do = normal(jax.random.key(T), (1, T, H, D), dtype)
    sm_scale = 0.7 / D ** 0.5
    f32 = lambda x: x.astype(jnp.float32)
    o, ref_vjp = jax.vjp(lambda q, k, v: reference.attention(q, k, v, causal=causal,
                                                             sm_scale=sm_scale),
                         f32(q), f32(k), f32(v))
    lse = reference_lse(q, k, causal, sm_scale)
    delta = jnp.einsum("bthd,bthd->bht", o, f32(do))
    with extended_gpu_interpreter() as interpret:
        blocks = mgpu.MosaicBlocks(block_kv=64, bwd_block_q=bwd_block_q,
                                   bwd_block_kv=bwd_block_kv)
        grads = mgpu_bwd.flash_backward(q, k, v, do, lse, delta, causal=causal,
                                        sm_scale=sm_scale, blocks=blocks, interpret=interpret)
        jax.block_until_ready(grads)
    assert not races_found()
    for name, g, x, ref_g in zip("qkv", grads, (q, k, v), ref_vjp(f32(do))):
        assert g.shape == x.shape and g.dtype == dtype, name
        assert rel_err(g, ref_g) < HALF_TOL, name


@pytest.mark.parametrize("gpu_forward,gpu_backward,kernels", [
    ("mosaic", "mosaic", ("fwd", "dq", "dkv")),
    pytest.param("mosaic", "triton", ("fwd",), marks=pytest.mark.slow),
    pytest.param("triton", "mosaic", ("dq", "dkv"), marks=pytest.mark.slow),
])
def test_wrapper_uses_them_and_gradients_match_reference(gpu_forward, gpu_backward, kernels):
    """flash_attention with Mosaic kernels, alone or mixed with the Triton-formulation ones:
    odd length (padded), GQA 2, causal."""
    B, T, H, K, D = 1, 200, 2, 1, 64
    q, k, v = qkv(3, B, T, H, K, D, jnp.bfloat16)
    do = normal(jax.random.key(4), (B, T, H, D), jnp.float32)
    blocks = fa.BlockSizes(block_q=64, block_kv=64, block_q_bwd=64, block_kv_bwd=64,
                           gpu_forward=gpu_forward, gpu_backward=gpu_backward,
                           mosaic=mgpu.MosaicBlocks(block_kv=64))
    with extended_gpu_interpreter() as interpret:
        attn = lambda q, k, v: fa.flash_attention(q, k, v, causal=True, block_sizes=blocks,
                                                  interpret=interpret)
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: jax.vjp(attn, q, k, v)[1](q))(q, k, v))
        for name in ("fwd", "dq", "dkv"):
            assert (f"flash_attention_{name}_hopper" in jaxpr) == (name in kernels), name
        o, vjp = jax.vjp(attn, q, k, v)
        grads = jax.block_until_ready(vjp(do.astype(o.dtype)))
    assert not races_found()
    assert_matches_reference(o, grads, q, k, v, do.astype(jnp.bfloat16), causal=True)


@pytest.mark.parametrize("gpu_backward", ["mosaic",
                                          pytest.param("triton", marks=pytest.mark.slow)])
def test_wrapper_with_segments_matches_reference(gpu_backward):
    """Packed documents through flash_attention with the Mosaic forward and the Mosaic (or
    Triton, reading the Mosaic LSE) backward: odd length, a padding tail, GQA 2."""
    B, T, H, K, D = 2, 200, 2, 1, 64
    q, k, v = qkv(5, B, T, H, K, D, jnp.bfloat16)
    seg = jnp.asarray([[1] * 70 + [2] * 100 + [0] * 30, [3] * 150 + [4] * 50], jnp.int32)
    do = normal(jax.random.key(6), (B, T, H, D), jnp.bfloat16)
    blocks = fa.BlockSizes(block_q=64, block_kv=64, block_q_bwd=64, block_kv_bwd=64,
                           gpu_forward="mosaic", gpu_backward=gpu_backward,
                           mosaic=mgpu.MosaicBlocks(block_kv=64))
    with extended_gpu_interpreter() as interpret:
        attn = lambda q, k, v: fa.flash_attention(q, k, v, segment_ids=seg, causal=True,
                                                  block_sizes=blocks, interpret=interpret)
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: jax.vjp(attn, q, k, v)[1](q))(q, k, v))
        assert "flash_attention_fwd_hopper" in jaxpr
        assert ("flash_attention_dkv_hopper" in jaxpr) == (gpu_backward == "mosaic")
        o, vjp = jax.vjp(attn, q, k, v)
        grads = jax.block_until_ready(vjp(do))
    assert not races_found()
    assert_matches_reference(o, grads, q, k, v, do, segment_ids=seg)
    assert not np.asarray(o, np.float32)[0, 170:].any()


def test_wrapper_masks_padded_keys_without_causality():
    """Non-causal attention over a length that is not a block multiple: the wrapper pads the
    keys and masks them with segment ids of 0, now inside the Mosaic kernels too."""
    B, T, H, K, D = 1, 200, 2, 1, 64
    q, k, v = qkv(9, B, T, H, K, D, jnp.bfloat16)
    do = normal(jax.random.key(10), (B, T, H, D), jnp.bfloat16)
    blocks = fa.BlockSizes(block_q=64, block_kv=64, block_q_bwd=64, block_kv_bwd=64,
                           gpu_forward="mosaic", gpu_backward="mosaic",
                           mosaic=mgpu.MosaicBlocks(block_kv=64))
    with extended_gpu_interpreter() as interpret:
        attn = lambda q, k, v: fa.flash_attention(q, k, v, causal=False, block_sizes=blocks,
                                                  interpret=interpret)
        o, vjp = jax.vjp(attn, q, k, v)
        grads = jax.block_until_ready(vjp(do))
    assert not races_found()
    assert_matches_reference(o, grads, q, k, v, do, causal=False)


@pytest.mark.parametrize("dtype,D,reason", [
    (jnp.float32, 64, "dtype float32"),
    (jnp.bfloat16, 80, "head dim 80"),
    (jnp.bfloat16, 320, "head dim 320"),
    (jnp.float16, 256, None),
])
def test_unsupported_reason(dtype, D, reason):
    assert "backward" in mgpu.unsupported_reason(jnp.bfloat16, 256, backward=True)
    assert mgpu.unsupported_reason(jnp.bfloat16, 128, backward=True) is None
    got = mgpu.unsupported_reason(dtype, D)
    assert (got is None) if reason is None else (reason in got)


def test_bad_blocks_and_lengths_are_refused():
    with pytest.raises(ValueError, match="block_q .32. must be a multiple of 64"):
        mgpu.MosaicBlocks(block_q=32)
    with pytest.raises(ValueError, match="bwd_block_kv .96. must be a multiple of 64"):
        mgpu.MosaicBlocks(bwd_block_kv=96)
    with pytest.raises(ValueError, match="num_stages"):
        mgpu.MosaicBlocks(num_stages=1)
    with pytest.raises(ValueError, match="gpu_forward"):
        fa.BlockSizes(gpu_forward="cutlass")
    with pytest.raises(ValueError, match="gpu_backward"):
        fa.BlockSizes(gpu_backward="cudnn")
    q = jnp.zeros((1, 100, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiples of 128"):
        mgpu.flash_forward(q, q, q, causal=True, sm_scale=0.1, blocks=mgpu.MosaicBlocks())
    with pytest.raises(ValueError, match="float32"):
        mgpu.flash_forward(q.astype(jnp.float32), q, q, causal=True, sm_scale=0.1,
                           blocks=mgpu.MosaicBlocks())
    q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="sm_scale > 0"):
        mgpu.flash_forward(q, q, q, causal=True, sm_scale=-0.1, blocks=mgpu.MosaicBlocks())
    with pytest.raises(ValueError, match="T == S"):
        mgpu_bwd.flash_backward(q, q[:, :64], q[:, :64], q, jnp.zeros((1, 2, 128)),
                                jnp.zeros((1, 2, 128)), causal=True, sm_scale=0.1,
                                blocks=mgpu.MosaicBlocks(bwd_block_kv=64, block_kv=64))


# --------------------------------------------------------------------------------------
# Lowered for CUDA from CPU: Mosaic and Triton kernels as asked; the fallbacks
# --------------------------------------------------------------------------------------

def lowered_calls(B, T, H, K, D, dtype, *, causal, segments, gpu_forward="mosaic",
                  gpu_backward="mosaic", S=None, sm_scale=None):
    """(Mosaic GPU calls, Triton calls) of a jitted forward + backward lowered for CUDA."""
    q = jnp.zeros((B, T, H, D), dtype)
    k = jnp.zeros((B, S or T, K, D), dtype)
    seg = jnp.ones((B, T), jnp.int32) if segments else None
    blocks = fa.BlockSizes(**{**fa.BlockSizes.default("gpu").__dict__,
                              "gpu_forward": gpu_forward, "gpu_backward": gpu_backward})

    def fwd_bwd(q, k, v, seg):
        fn = lambda q, k, v: fa.flash_attention(q, k, v, segment_ids=seg, causal=causal,
                                                sm_scale=sm_scale, block_sizes=blocks,
                                                _target="gpu")
        o, vjp = jax.vjp(fn, q, k, v)
        return o, vjp(o)

    text = lowered_text(fwd_bwd, q, k, k, seg, platform="cuda")
    calls = re.findall(r"custom_call @([\w$.]+)", text)
    return calls.count("mosaic_gpu_v2"), calls.count("__gpu$xla.gpu.triton")


@pytest.mark.parametrize("causal,T,D,calls", [(True, 1000, 64, (3, 0)),
                                               (False, 1024, 128, (3, 0)),
                                               (True, 512, 256, (1, 2))])   # bwd: Triton
def test_lowers_for_hopper(causal, T, D, calls):
    """Default tiles lower (Mosaic checks they fit the 227 KiB of shared memory)."""
    assert lowered_calls(2, T, 8, 2, D, jnp.bfloat16, causal=causal, segments=False) == calls


@pytest.mark.parametrize("gpu_forward,gpu_backward,calls", [("mosaic", "triton", (1, 2)),
                                                            ("triton", "mosaic", (2, 1))])
def test_lowers_mixed(gpu_forward, gpu_backward, calls):
    assert lowered_calls(1, 512, 4, 1, 128, jnp.bfloat16, causal=True, segments=False,
                         gpu_forward=gpu_forward, gpu_backward=gpu_backward) == calls


@pytest.mark.parametrize("dtype,segments,T,S,causal,sm_scale,calls", [
    (jnp.float32, False, 256, 256, True, None, (0, 3)),      # dtype
    (jnp.bfloat16, True, 256, 256, True, None, (3, 0)),      # segment ids: Mosaic too
    (jnp.bfloat16, False, 256, 300, False, None, (3, 0)),    # padded keys: Mosaic masks
    (jnp.bfloat16, False, 256, 256, True, -0.125, (0, 3)),   # a negative scale
])
def test_falls_back_to_triton_only_where_it_must(dtype, segments, T, S, causal, sm_scale,
                                                  calls):
    assert lowered_calls(1, T, 4, 2, 64, dtype, causal=causal, segments=segments,
                         S=S, sm_scale=sm_scale) == calls


# --------------------------------------------------------------------------------------
# Compiled on a Hopper GPU (skipped elsewhere)
# --------------------------------------------------------------------------------------

@pytest.mark.skipif(not mgpu.is_hopper(jax.devices()[0]), reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [64, 128])
def test_compiled_on_hopper(causal, D):
    B, T, H, K = 2, 1000, 8, 2
    q, k, v = qkv(D, B, T, H, K, D, jnp.bfloat16)
    do = normal(jax.random.key(9), (B, T, H, D), jnp.bfloat16)
    blocks = fa.BlockSizes(**{**fa.BlockSizes.default("gpu").__dict__, "gpu_forward": "mosaic",
                              "gpu_backward": "mosaic"})
    attn = lambda q, k, v: fa.flash_attention(q, k, v, causal=causal, block_sizes=blocks)
    o, vjp = jax.vjp(jax.jit(attn), q, k, v)
    grads = vjp(do)
    assert_matches_reference(o, grads, q, k, v, do, causal=causal)


@pytest.mark.skipif(not mgpu.is_hopper(jax.devices()[0]), reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("causal", [True, False])
def test_compiled_on_hopper_with_segments(causal):
    """Packed rows on hardware: SKIP blocks inside a warpgroup's range, one warpgroup with
    nothing to visit, padding rows (LSE -inf), all three kernels in segment mode."""
    B, T, H, K, D = 3, 1024, 4, 2, 128
    rows = [row * 4 for row in SEGMENT_ROWS]          # 256 -> 1024 tokens, ids repeat
    seg = jnp.asarray(rows, jnp.int32)
    q, k, v = qkv(11, B, T, H, K, D, jnp.bfloat16)
    do = normal(jax.random.key(12), (B, T, H, D), jnp.bfloat16)
    blocks = fa.BlockSizes(**{**fa.BlockSizes.default("gpu").__dict__, "gpu_forward": "mosaic",
                              "gpu_backward": "mosaic"})
    attn = lambda q, k, v: fa.flash_attention(q, k, v, segment_ids=seg, causal=causal,
                                              block_sizes=blocks)
    o, vjp = jax.vjp(jax.jit(attn), q, k, v)
    grads = vjp(do)
    assert_matches_reference(o, grads, q, k, v, do, segment_ids=seg, causal=causal)
