"""The KV cache and the model's decoding path: layout, cached attention semantics, and cached
decoding (prefill, chunks, single steps) against one uncached forward pass."""
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax.kernels import reference
from instructjax.model import cache as cache_lib
from instructjax.model import transformer as tm
from instructjax.model.config import ModelConfig

# The model tests' tiny config: GQA (4 query heads on 2 kv heads), qkv bias, untied head.
BASE = ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=48, max_seq_len=32, qkv_bias=True, tie_embeddings=False)
# Cached and uncached passes compute the same float32 math; they differ in summation length
# (masked slots add exact zeros) and XLA's fusion order. Measured gap ~2e-6 on unit-scale
# logits after two blocks; 1e-5 leaves ~5x headroom, while attending to one wrong slot or a
# wrong RoPE position moves logits by 1e-2 or more.
CACHE_TOL = dict(atol=1e-5, rtol=1e-5)


def normal(key, shape):
    # Flat draw reshaped: rank-3+ threefry compiles slowly on this CPU.
    return jax.random.normal(key, (int(np.prod(shape)),)).reshape(shape)


@functools.lru_cache(maxsize=None)
def params_for(cfg):
    return tm.init_params(cfg, jax.random.key(0))


def left_padded_batch():
    """Tokens [3, 12] with 3, 0 and 7 left pads, mask, and positions cumsum(mask) - 1."""
    mask = np.ones((3, 12), np.int32)
    mask[0, :3] = 0
    mask[2, :7] = 0
    flat = jax.random.randint(jax.random.key(1), (36,), 4, BASE.vocab_size)
    tokens = jnp.asarray(flat.reshape(3, 12) * mask, jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    return tokens, jnp.asarray(mask), positions


def test_init_cache_layout():
    cache = cache_lib.init_cache(BASE, batch=3, max_len=20)
    assert cache.k.shape == cache.v.shape == (2, 3, 20, 2, 8)
    assert cache.k.dtype == jnp.float32 and cache.max_len == 20
    assert cache_lib.init_cache(BASE.replace(dtype="bfloat16"), 1, 4).v.dtype == jnp.bfloat16
    assert cache_lib.init_cache(BASE, 1, 4, dtype="bfloat16").k.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="max_seq_len"):
        cache_lib.init_cache(BASE, 1, 33)
    specs = cache_lib.logical_partition_specs()
    assert tuple(specs.k) == tuple(specs.v) == cache_lib.CACHE_AXES
    assert len(cache_lib.CACHE_AXES) == cache.k.ndim


def test_write_puts_the_chunk_at_the_index_of_every_row():
    cache = cache_lib.init_cache(BASE, batch=2, max_len=6)
    chunk = cache_lib.KVCache(k=jnp.ones((2, 2, 3, 2, 8)), v=2 * jnp.ones((2, 2, 3, 2, 8)))
    written = jax.jit(lambda c, x, i: c.write(x, i))(cache, chunk, 2)
    slots_written = np.any(np.asarray(written.k) != 0, axis=(0, 1, 3, 4))
    np.testing.assert_array_equal(slots_written, [False, False, True, True, True, False])
    assert np.all(np.asarray(written.v)[:, :, 2:5] == 2.0)


def test_cached_attention_is_masked_causal_attention_over_slots():
    B, S, H, K, D = 3, 12, 4, 2, 8
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q, k, v = normal(kq, (B, S, H, D)), normal(kk, (B, S, K, D)), normal(kv, (B, S, K, D))
    _, mask, _ = left_padded_batch()
    full = jax.jit(reference.attention)(q, k, v, segment_ids=mask)
    cached = jax.jit(reference.cached_attention)
    # All queries at once (a prefill), then a chunk of queries from slot 7 on: the slots
    # after each query (here holding arbitrary values) must stay invisible.
    np.testing.assert_allclose(cached(q, k, v, kv_mask=mask, q_offset=0), full, **CACHE_TOL)
    np.testing.assert_allclose(cached(q[:, 7:10], k, v, kv_mask=mask, q_offset=7),
                               full[:, 7:10], **CACHE_TOL)
    # Padding queries see no slot and come out exactly 0, as in `attention`.
    assert np.all(np.asarray(cached(q, k, v, kv_mask=mask, q_offset=0))[2, :7] == 0.0)


@pytest.mark.parametrize("scan", [True, False])
def test_prefill_chunk_and_steps_match_one_forward_pass(scan):
    cfg = BASE.replace(scan_layers=scan)
    params = params_for(BASE)
    if not scan:
        params = tm.unstack_layer_params(params)
    tokens, mask, positions = left_padded_batch()
    full = jax.jit(lambda p, x, pos, seg: tm.Transformer(cfg).apply(
        {"params": p}, x, pos, seg))(params, tokens, positions, mask)

    @jax.jit
    def decode(params, x, pos, cache, index):
        return tm.Transformer(cfg).apply({"params": params}, x, pos, cache, index, mask,
                                         method="decode")

    # A 5-token prefill, a 3-token chunk at slot 5, then one token per call: every way the
    # rollout (or a chunked prefill) calls the model.
    cache = cache_lib.init_cache(cfg, batch=3, max_len=12)
    pieces = []
    for start, stop in [(0, 5), (5, 8)] + [(i, i + 1) for i in range(8, 12)]:
        logits, cache = decode(params, tokens[:, start:stop], positions[:, start:stop], cache,
                               start)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, **CACHE_TOL)
    # The cache now holds every slot's keys and values, padding slots included.
    assert np.all(np.any(np.asarray(cache.k) != 0, axis=(0, 3, 4)))


def test_decoding_keeps_the_param_tree_and_checks_its_arguments():
    params = params_for(BASE)
    model = tm.Transformer(BASE)
    tokens = jnp.ones((2, 4), jnp.int32)
    cache = cache_lib.init_cache(BASE, batch=2, max_len=8)

    def decode(cache, cache_index, **kwargs):
        return jax.eval_shape(lambda: model.apply({"params": params}, tokens, None, cache,
                                                  cache_index, method="decode", **kwargs))

    logits, new_cache = decode(cache, 0)
    assert logits.shape == (2, 4, 61) and logits.dtype == jnp.float32
    assert new_cache.k.shape == cache.k.shape and new_cache.v.dtype == cache.v.dtype
    # Decoding runs the training path's modules under the same names: no new params.
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens, None, cache, 0,
                                                  method="decode"))
    chex.assert_trees_all_equal_shapes_and_dtypes(nn.meta.unbox(variables["params"]), params)
    with pytest.raises(ValueError, match="cache_index"):
        decode(cache, None)
    # Padding is kv_mask's job when decoding: there is no segment_ids argument.
    with pytest.raises(TypeError, match="segment_ids"):
        decode(cache, 0, segment_ids=tokens)
    with pytest.raises(ValueError, match="kv_mask"):
        decode(cache, 0, kv_mask=tokens)
    with pytest.raises(ValueError, match=r"\[L, B, S, K, D\]"):
        decode(cache_lib.init_cache(BASE, batch=1, max_len=8), 0)
