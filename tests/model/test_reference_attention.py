"""kernels/reference.py against an independent float64 loop over (batch, head, query)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax.kernels import reference

# float32 scores and softmax vs float64: a few ulps per dot product of D=16 terms with
# unit-scale inputs, so 1e-5 absolute and relative leaves ~50x headroom and still catches
# any wrong mask, scale or head mapping (those give O(0.1) errors).
F32_TOL = dict(atol=1e-5, rtol=1e-5)

# Jitted once: op-by-op dispatch on CPU is what would make these tests slow.
attention = jax.jit(reference.attention, static_argnames=("causal", "sm_scale"))


def loop_attention(q, k, v, segment_ids, causal, sm_scale=None):
    """Attention written query by query in float64 numpy, with no shared code."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    group = H // K
    scale = D ** -0.5 if sm_scale is None else sm_scale
    out = np.zeros((B, T, H, D))
    for b in range(B):
        for h in range(H):
            kv = h // group
            for t in range(T):
                visible = []
                for s in range(S):
                    if causal and s > t:
                        continue
                    if segment_ids is not None and (
                            segment_ids[b, t] == 0 or segment_ids[b, s] != segment_ids[b, t]):
                        continue
                    visible.append(s)
                if not visible:
                    continue
                scores = np.array([q[b, t, h] @ k[b, s, kv] * scale for s in visible])
                weights = np.exp(scores - scores.max())
                weights /= weights.sum()
                out[b, t, h] = sum(w * v[b, s, kv] for w, s in zip(weights, visible))
    return out


def normal(key, shape, dtype=jnp.float32):
    # Drawn flat and reshaped: on this CPU, XLA takes seconds to compile threefry for
    # rank-4 shapes but milliseconds for rank 1 (the values are equally random).
    return jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)


def random_qkv(seed, B, T, S, H, K, D, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = normal(kq, (B, T, H, D), dtype)
    k = normal(kk, (B, S, K, D), dtype)
    v = normal(kv, (B, S, K, D), dtype)
    return q, k, v


def packed_segment_ids():
    """[2, 16]: row 0 holds three documents and padding, row 1 two documents, no padding."""
    return jnp.array([[1] * 5 + [2] * 6 + [3] * 2 + [0] * 3,
                      [1] * 9 + [2] * 7], jnp.int32)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])  # query-group sizes 1, 2, 4
@pytest.mark.parametrize("causal,packed", [(True, False), (False, False), (True, True),
                                           (False, True)])
def test_matches_float64_loop(num_kv_heads, causal, packed):
    q, k, v = random_qkv(0, B=2, T=16, S=16, H=4, K=num_kv_heads, D=16)
    segment_ids = packed_segment_ids() if packed else None
    out = attention(q, k, v, segment_ids=segment_ids, causal=causal)
    chex.assert_shape(out, q.shape)
    chex.assert_type(out, jnp.float32)
    expected = loop_attention(q, k, v, None if segment_ids is None else np.asarray(segment_ids),
                              causal)
    np.testing.assert_allclose(out, expected, **F32_TOL)


@pytest.mark.parametrize("num_kv_heads", [3, 1])
def test_non_causal_cross_lengths(num_kv_heads):
    # T != S only makes sense without causality or segment ids (e.g. a query chunk against
    # a longer context).
    q, k, v = random_qkv(1, B=2, T=5, S=11, H=6, K=num_kv_heads, D=8)
    out = attention(q, k, v, causal=False, sm_scale=0.3)
    np.testing.assert_allclose(out, loop_attention(q, k, v, None, False, 0.3), **F32_TOL)


def test_gqa_equals_repeated_kv_heads():
    # GQA must be multi-head attention with each kv head repeated for its consecutive
    # query heads (the Hugging Face order).
    q, k, v = random_qkv(2, B=2, T=12, S=12, H=8, K=2, D=8)
    gqa = attention(q, k, v)
    mha = attention(q, jnp.repeat(k, 4, axis=2), jnp.repeat(v, 4, axis=2))
    np.testing.assert_allclose(gqa, mha, **F32_TOL)


def test_mask_helper():
    seg = packed_segment_ids()
    mask = reference.make_attention_mask(seg, seg, causal=True)
    chex.assert_shape(mask, (2, 16, 16))
    seg_np = np.asarray(seg)
    for b in range(2):
        for t in range(16):
            for s in range(16):
                want = s <= t and seg_np[b, t] == seg_np[b, s] and seg_np[b, t] != 0
                assert bool(mask[b, t, s]) == want, (b, t, s)
    with pytest.raises(ValueError, match="equal query and key lengths"):
        reference.make_attention_mask(seg, seg[:, :8], causal=True)


def test_padding_rows_are_zero_with_finite_gradients():
    q, k, v = random_qkv(3, B=3, T=16, S=16, H=4, K=2, D=8)
    # Row 2 is all padding: every query there has an empty row.
    seg = jnp.concatenate([packed_segment_ids(), jnp.zeros((1, 16), jnp.int32)])
    pad = np.asarray(seg) == 0

    out = attention(q, k, v, segment_ids=seg)
    assert np.all(np.asarray(out)[pad] == 0.0)
    chex.assert_tree_all_finite(out)

    def loss(q, k, v):
        return jnp.sum(jnp.sin(reference.attention(q, k, v, segment_ids=seg)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    chex.assert_tree_all_finite(grads)
    dq, dk, dv = (np.asarray(g) for g in grads)
    # Padding tokens neither ask (dq) nor answer (dk, dv): their gradients are exactly 0.
    assert np.all(dq[pad] == 0.0) and np.all(dk[pad] == 0.0) and np.all(dv[pad] == 0.0)
    assert np.any(dq[~pad] != 0.0)


def test_gradients_match_plain_softmax_attention():
    # Gradients of the masked path against a dense softmax attention on the same mask
    # (a different code path: repeated kv heads, -inf fill, jax.nn.softmax), in float32.
    # No row is fully masked here, so the -inf version is NaN-free.
    q, k, v = random_qkv(4, B=2, T=16, S=16, H=4, K=2, D=8)
    seg = jnp.array([[1] * 7 + [2] * 9, [1] * 16], jnp.int32)
    mask = reference.make_attention_mask(seg, seg, causal=True)

    def dense(q, k, v):
        kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        scores = jnp.einsum("bthd,bshd->bhts", q, kr) * 8 ** -0.5
        scores = jnp.where(mask[:, None, :, :], scores, -jnp.inf)
        return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(scores, axis=-1), vr)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.cos(fn(q, k, v)))

    ours = jax.jit(jax.grad(loss(lambda q, k, v: reference.attention(q, k, v, segment_ids=seg)),
                            argnums=(0, 1, 2)))(q, k, v)
    theirs = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
    chex.assert_trees_all_close(ours, theirs, **F32_TOL)


def test_bfloat16_inputs():
    q, k, v = random_qkv(5, B=2, T=16, S=16, H=4, K=2, D=16, dtype=jnp.bfloat16)
    out = attention(q, k, v, segment_ids=packed_segment_ids())
    chex.assert_type(out, jnp.bfloat16)
    expected = loop_attention(q.astype(jnp.float32), k.astype(jnp.float32),
                              v.astype(jnp.float32), np.asarray(packed_segment_ids()), True)
    # bf16 keeps 8 mantissa bits: the probabilities and the output are each rounded once
    # (relative 2**-8 ~ 4e-3) on unit-scale values, so 2e-2 absolute.
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, atol=2e-2, rtol=0)


def test_shape_errors():
    q, k, v = random_qkv(6, B=1, T=8, S=8, H=3, K=2, D=4)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        reference.attention(q, k, v)
    q, k, v = random_qkv(6, B=1, T=8, S=10, H=4, K=2, D=4)
    with pytest.raises(ValueError, match="equal query and key lengths"):
        reference.attention(q, k, v, causal=True)
