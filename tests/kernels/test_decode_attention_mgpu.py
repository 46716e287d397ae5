"""kernels/decode_mgpu.py: the Hopper (Mosaic GPU) decode kernel.

On CPU it runs in jax's Mosaic GPU interpreter extended by `_mgpu_interpret.py` (producer
and compute warpgroups as threads, TMA and mbarriers simulated, race detector on), through
the decode_attention wrapper with gpu_kernel="mosaic", against the float32 plain-jnp
reference: ragged lengths (0, mid-block, block and split boundaries, full), a kv mask (the
left padding of rollout prompts), stale NaN past the lengths, GQA groups 1 to 8, head dims
64 and 128, more splits than a sequence has blocks. The compiled kernel is lowered for CUDA
from CPU; running it needs a Hopper GPU (the compiled test at the end).
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _lowering import lowered_text
from _mgpu_interpret import extended_gpu_interpreter, races_found
from instructjax.kernels import decode as da
from instructjax.kernels import decode_mgpu as dmgpu
from instructjax.kernels import flash_mgpu as mgpu
from instructjax.kernels import reference

# bf16 / f16 inputs against float32 on the same rounded values: P is rounded before the P V
# matmul and the output on return (~4e-3 relative), as in test_decode_attention.py.
HALF_TOL = 1e-2


def normal(key, shape, dtype):
    return jax.random.normal(key, (int(np.prod(shape)),), jnp.float32).reshape(shape).astype(dtype)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm((x - ref).ravel()) / np.linalg.norm(ref.ravel()))


def inputs(seed, B, H, K, D, L, dtype, lengths):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = normal(ks[0], (B, H, D), dtype)
    k, v = normal(ks[1], (B, L, K, D), dtype), normal(ks[2], (B, L, K, D), dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    # Stale entries past each length may hold anything: NaN must not reach the output.
    past = jnp.arange(L)[None, :, None, None] >= lengths[:, None, None, None]
    k, v = jnp.where(past, jnp.nan, k).astype(dtype), jnp.where(past, jnp.nan, v).astype(dtype)
    # Left padding: each row hides a few leading positions below its length.
    kv_mask = (jnp.arange(L)[None] >= jnp.arange(B)[:, None] * 3).astype(jnp.int32)
    return q, k, v, lengths, kv_mask


def reference_out(q, k, v, lengths, kv_mask):
    f32 = lambda x: jnp.nan_to_num(x.astype(jnp.float32))
    return reference.decode_attention_reference(f32(q), f32(k), f32(v), lengths,
                                                kv_mask=kv_mask)


# (G, D, L, block_kv, num_splits, stages-relevant lengths, dtype): L = 200 is not a block
# multiple (padded to 256); splits of 2 blocks end at 128 / 256; 1 and 63 end mid-block;
# 7 splits is more than most rows have blocks (empty splits); G = 1, 4, 8; f16.
CASES = [
    (4, 128, 200, 64, 2, [0, 1, 64, 137, 200], jnp.bfloat16),
    (1, 64, 256, 64, 1, [256, 63, 128, 5], jnp.bfloat16),
    pytest.param(8, 64, 320, 64, 3, [320, 190, 0], jnp.float16, marks=pytest.mark.slow),
    pytest.param(2, 128, 448, 64, 7, [449, 100], jnp.bfloat16, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("G,D,L,block_kv,num_splits,lengths,dtype", CASES)
def test_matches_reference(G, D, L, block_kv, num_splits, lengths, dtype):
    K = 2
    q, k, v, lengths, kv_mask = inputs(G * D + L, len(lengths), G * K, K, D, L, dtype,
                                       lengths)
    with extended_gpu_interpreter() as interpret:
        out = da.decode_attention(q, k, v, lengths, kv_mask=kv_mask, num_splits=num_splits,
                                  block_kv=block_kv, interpret=interpret, gpu_kernel="mosaic")
        jax.block_until_ready(out)
    assert not races_found()
    assert out.shape == q.shape and out.dtype == dtype
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    ref = reference_out(q, k, v, lengths, kv_mask)
    empty = np.asarray(lengths) == 0
    np.testing.assert_array_equal(out[empty], 0.0)
    assert rel_err(out[~empty], ref[~empty]) < HALF_TOL


def test_wrapper_falls_back_to_triton_where_it_must():
    """float32, head dim 256 and sm_scale <= 0 take the Triton kernel even when "mosaic" is
    asked for (lowered for CUDA from CPU: which custom calls appear)."""
    def calls(dtype, D, sm_scale=None, gpu_kernel="mosaic"):
        q = jnp.zeros((2, 8, D), dtype)
        k = jnp.zeros((2, 256, 2, D), dtype)
        fn = functools.partial(da.decode_attention, sm_scale=sm_scale, gpu_kernel=gpu_kernel,
                               _target="gpu")
        text = lowered_text(fn, q, k, k, jnp.array([3, 256], jnp.int32), platform="cuda")
        found = re.findall(r"custom_call @([\w$.]+)", text)
        return found.count("mosaic_gpu_v2"), found.count("__gpu$xla.gpu.triton")

    assert calls(jnp.bfloat16, 128) == (1, 0)
    assert calls(jnp.bfloat16, 64) == (1, 0)
    assert calls(jnp.bfloat16, 128, gpu_kernel="triton") == (0, 1)
    assert calls(jnp.float32, 128) == (0, 1)
    assert calls(jnp.bfloat16, 256) == (0, 1)
    assert calls(jnp.bfloat16, 128, sm_scale=-0.1) == (0, 1)


def test_shared_memory_budget_and_bad_arguments():
    # Lowering checks shared memory: the most slots that fit at each supported shape lower.
    for D, bk in [(64, 64), (64, 256), (128, 64), (128, 128)]:
        stages = dmgpu.fitting_stages(D, bk)
        assert stages >= 2
        q = jnp.zeros((1, 2, dmgpu.ROWS, D), jnp.bfloat16)
        k = jnp.zeros((1, bk * stages, 2, D), jnp.bfloat16)
        fn = functools.partial(dmgpu.decode_partials, group=4, sm_scale=0.1, block_kv=bk,
                               blocks_per_split=stages, num_splits=1, num_stages=stages)
        lowered_text(fn, q, k, k, jnp.zeros((1,), jnp.int32),
                     jnp.zeros((1, bk * stages), jnp.int32), platform="cuda")
    assert dmgpu.unsupported_reason(jnp.float32, 128, 4).startswith("dtype")
    assert dmgpu.unsupported_reason(jnp.bfloat16, 256, 4).startswith("head dim")
    assert dmgpu.unsupported_reason(jnp.bfloat16, 128, 65).startswith("65 query heads")
    q = jnp.zeros((1, 8, 128), jnp.bfloat16)
    k = jnp.zeros((1, 128, 2, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="multiple of 64"):
        da.decode_attention(q, k, k, jnp.ones((1,), jnp.int32), block_kv=32,
                            gpu_kernel="mosaic", _target="gpu")
    with pytest.raises(ValueError, match="gpu_kernel"):
        da.decode_attention(q, k, k, jnp.ones((1,), jnp.int32), gpu_kernel="cuda",
                            _target="gpu")


@pytest.mark.skipif(not mgpu.is_hopper(jax.devices()[0]), reason="needs a Hopper (sm_90) GPU")
@pytest.mark.parametrize("D", [64, 128])
def test_compiled_on_hopper(D):
    B, K, G, L = 8, 4, 4, 1000
    q, k, v, lengths, kv_mask = inputs(D, B, K * G, K, D, L, jnp.bfloat16,
                                       [0, 1, 64, 500, 999, 1000, 333, 777])
    out = jax.jit(functools.partial(da.decode_attention, gpu_kernel="mosaic"))(
        q, k, v, lengths, kv_mask=kv_mask)
    out = np.asarray(out, np.float32)
    assert np.isfinite(out).all()
    ref = reference_out(q, k, v, lengths, kv_mask)
    assert rel_err(out[1:], ref[1:]) < HALF_TOL and not out[0].any()
