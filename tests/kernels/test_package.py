"""The kernels package's public surface: `from instructjax.kernels import flash_attention` is
the function of DESIGN.md's signature (likewise decode_attention and the plain-jnp
references), whatever submodules are imported, and each kernel export matches its reference
on a small case in interpret mode."""
import functools
import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np

import instructjax.kernels as kernels
from instructjax.kernels import (cached_attention, decode_attention, decode_attention_reference,
                                 flash_attention, reference_attention)

# Relative norm error, as in test_flash_attention.py / test_decode_attention.py: float32
# kernels differ from the reference in summation order only (~1e-7); a wrong mask, scale or
# head mapping gives O(0.1).
F32_TOL = 1e-5
# XLA CPU optimisation level 0: faster compiles of the interpreted kernels, same numerics.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def normal(key, shape):
    # Drawn flat and reshaped: XLA on this CPU compiles rank-4 threefry slowly.
    return jax.random.normal(key, (int(np.prod(shape)),), jnp.float32).reshape(shape)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm((x - ref).ravel()) / np.linalg.norm(ref.ravel()))


def test_exports_are_functions_not_modules():
    assert sorted(kernels.__all__) == ["BlockSizes", "cached_attention", "decode_attention",
                                       "decode_attention_reference", "flash_attention",
                                       "reference_attention"]
    exported = {name: getattr(kernels, name) for name in kernels.__all__}
    # Importing a submodule sets it as an attribute of the package: none may be named like
    # an export, or importing it would replace the function with the module.
    for name in ("flash", "flash_kernels", "flash_mgpu", "flash_mgpu_bwd", "decode",
                 "decode_mgpu", "block_sparsity", "reference"):
        importlib.import_module(f"instructjax.kernels.{name}")
    for name, value in exported.items():
        assert getattr(kernels, name) is value, name
        assert inspect.isclass(value) if name == "BlockSizes" else inspect.isfunction(value), name
    params = inspect.signature(flash_attention).parameters
    assert list(params)[:3] == ["q", "k", "v"]
    for name, default in [("segment_ids", None), ("causal", True), ("sm_scale", None),
                          ("interpret", False)]:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default == default, name


def test_flash_attention_matches_reference_attention():
    B, T, H, K, D = 2, 32, 4, 2, 16
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q, k, v = normal(kq, (B, T, H, D)), normal(kk, (B, T, K, D)), normal(kv, (B, T, K, D))
    # Two packed documents and trailing padding in row 0; one document in row 1.
    segment_ids = jnp.array([[1] * 12 + [2] * 14 + [0] * 6, [1] * T], jnp.int32)
    ours = jax.jit(functools.partial(flash_attention, interpret=True),
                   static_argnames="causal", compiler_options=FAST_COMPILE)
    for seg, causal in [(segment_ids, True), (None, True), (None, False)]:
        out = ours(q, k, v, segment_ids=seg, causal=causal)
        assert out.shape == (B, T, H, D) and out.dtype == jnp.float32
        ref = reference_attention(q, k, v, segment_ids=seg, causal=causal)
        assert rel_err(out, ref) < F32_TOL, (seg is not None, causal)


def test_decode_attention_matches_both_references():
    B, L, H, K, D = 3, 64, 4, 2, 16
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q, k, v = normal(kq, (B, H, D)), normal(kk, (B, L, K, D)), normal(kv, (B, L, K, D))
    index = 40                                  # the new token's slot, the same for all rows
    lengths = jnp.full((B,), index + 1, jnp.int32)
    kv_mask = jnp.ones((B, L), jnp.int32).at[1, :5].set(0).at[2, :17].set(0)  # left padding
    out = jax.jit(functools.partial(decode_attention, interpret=True),
                  compiler_options=FAST_COMPILE)(q, k, v, lengths, kv_mask=kv_mask)
    assert out.shape == (B, H, D) and out.dtype == jnp.float32
    ref = decode_attention_reference(q, k, v, lengths, kv_mask=kv_mask)
    assert rel_err(out, ref) < F32_TOL
    # The same step as the model's cached attention sees it: one query at slot `index`.
    cached = cached_attention(q[:, None], k, v, kv_mask=kv_mask, q_offset=index)[:, 0]
    assert rel_err(out, cached) < F32_TOL
