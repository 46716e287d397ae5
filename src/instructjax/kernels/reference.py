"""Plain-jnp multi-head attention with the exact semantics the Pallas kernels must match.

It is the `attention_impl='xla'` path of the model, the fallback on any backend, and the
reference the flash-attention and decode kernels are tested against.

Letters: B batch, T query length, S key length, H query heads, K kv heads,
G query-group size (H // K), D head dim.
"""
import jax
import jax.numpy as jnp


def make_attention_mask(segment_ids_q, segment_ids_k, causal, *, window=None):
    """Which keys each query may attend to.

    A query sees a key when both carry the same non-zero segment id and, if `causal`, the
    key does not come after the query. Segment id 0 marks padding: a padding query sees
    nothing, so its attention row is empty and `attention` returns 0 for it.

    Args:
        segment_ids_q: int [B, T], segment id of each query token.
        segment_ids_k: int [B, S], segment id of each key token.
        causal: when True, T must equal S and query t sees keys s <= t. Causality is by
            index in the row, which is what packing needs: packed documents are contiguous,
            so index order within a segment is document order.
        window: optional sliding window W >= 1 (needs causal): query t also needs
            s > t - W, so it sees at most its W latest keys. By index too: within a segment
            an index difference is a position difference.

    Returns:
        bool [B, T, S], True where the query may attend to the key.
    """
    T, S = segment_ids_q.shape[1], segment_ids_k.shape[1]
    same_BTS = segment_ids_q[:, :, None] == segment_ids_k[:, None, :]
    mask_BTS = same_BTS & (segment_ids_q[:, :, None] != 0)
    _check_window(window, causal)
    if causal:
        _check_causal_lengths(T, S)
        mask_BTS = mask_BTS & _causal_mask(T, window)[None, :, :]
    return mask_BTS


def _check_causal_lengths(T, S):
    if T != S:
        raise ValueError(f"causal attention needs equal query and key lengths, got {T} and {S}")


def _check_window(window, causal):
    if window is None:
        return
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if not causal:
        raise ValueError("a sliding window needs causal=True")


def _causal_mask(T, window=None):
    """bool [T, T], True on and below the diagonal (and within `window` of it, if given)."""
    return _slot_causal_mask(jnp.arange(T), T, window)


def _slot_causal_mask(slot_q_T, S, window):
    """bool [T, S]: key slot s is visible from query slot q when s <= q (and s > q - window)."""
    slot_k_S = jnp.arange(S)[None, :]
    mask_TS = slot_k_S <= slot_q_T[:, None]
    if window is not None:
        # transformers' sliding_window_overlay: kv_idx > q_idx - sliding_window.
        mask_TS = mask_TS & (slot_k_S > slot_q_T[:, None] - window)
    return mask_TS


def attention(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, window=None):
    """Softmax attention with grouped-query heads, packing by segment ids and causal masking.

    Args:
        q: [B, T, H, D] queries, any float dtype.
        k: [B, S, K, D] keys, same dtype as q; H must be a multiple of K. Query head h uses
            kv head h // (H // K): consecutive query heads share a kv head (Hugging Face's
            order, so imported weights need no permutation).
        v: [B, S, K, D] values, same dtype as q.
        segment_ids: optional int [B, T] shared by queries and keys (so T == S);
            0 = padding. None means one segment covering every token.
        causal: whether query t may only see keys s <= t (requires T == S).
        sm_scale: multiplier of q.k before the softmax; default 1/sqrt(D).
        window: optional sliding window W >= 1 (needs causal): query t sees only keys
            t - W < s <= t, by index in the row (see `make_attention_mask`).

    Returns:
        [B, T, H, D] in q.dtype. A query with no visible key (a padding row) gets exactly 0,
        with zero (never NaN) gradients.
    """
    B, T, H, D = q.shape
    S, K = k.shape[1], k.shape[2]
    if H % K != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K})")
    if k.shape != (B, S, K, D) or v.shape != (B, S, K, D):
        raise ValueError(f"k {k.shape} and v {v.shape} must both be [B, S, K, D] with "
                         f"B={B}, D={D}")
    G = H // K
    if sm_scale is None:
        sm_scale = D ** -0.5
    _check_window(window, causal)

    if segment_ids is not None:
        if segment_ids.shape != (B, T) or T != S:
            raise ValueError(f"segment_ids {segment_ids.shape} must be [B, T] = [{B}, {T}] "
                             f"and needs T == S (S = {S})")
        mask_BTS = make_attention_mask(segment_ids, segment_ids, causal, window=window)
    elif causal:
        _check_causal_lengths(T, S)
        mask_BTS = _causal_mask(T, window)[None, :, :]
    else:
        mask_BTS = None

    # Grouping the query heads lets each kv head serve its G query heads without repeating
    # k and v in memory.
    q_BTKGD = q.reshape(B, T, K, G, D)
    # Scores are accumulated and scaled in float32 whatever the input dtype: a softmax over
    # bf16 scores is too coarse for long rows.
    scores_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k,
                              preferred_element_type=jnp.float32) * sm_scale

    if mask_BTS is None:
        probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
    else:
        probs_BKGTS = masked_softmax(scores_BKGTS, mask_BTS[:, None, None, :, :])

    # Probabilities go to v's dtype for the second matmul, as a flash kernel does, with a
    # float32 accumulator.
    out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS.astype(v.dtype), v,
                           preferred_element_type=jnp.float32)
    return out_BTKGD.reshape(B, T, H, D).astype(q.dtype)


def masked_softmax(scores, mask):
    """Softmax over the last axis of float32 `scores` where `mask` (broadcastable) is set.

    Rows with no visible entry come out as exact zeros with zero gradients, never NaN.
    """
    # A finite fill (not -inf) keeps fully masked rows NaN-free: their max is the fill
    # itself, the where() below zeroes their weights, and the row sum is 0, not 0/0.
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    # The max is only a shift that keeps exp() in range; the softmax does not depend on it,
    # so stopping its gradient is exact and saves the backward pass an argmax.
    row_max = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    # Visible rows have denom >= 1 (the max term is exp(0) = 1); empty rows have 0.
    return weights / jnp.where(denom == 0.0, 1.0, denom)


def cached_attention(q, k_cache, v_cache, *, kv_mask, q_offset, sm_scale=None, window=None):
    """Attention of T new queries over a key/value cache: the decoding path's semantics.

    The queries sit at cache slots q_offset .. q_offset + T - 1 (their own keys are already
    written there). Query t of row b sees slot s when kv_mask[b, s] is set and
    s <= q_offset + t: causal order by slot, padding slots (left padding of a prompt) and
    unwritten slots hidden by the mask. The pallas decode kernel (kernels/decode.py)
    covers the special case T == 1 with a prefix mask.

    Args:
        q: [B, T, H, D] queries, any float dtype.
        k_cache: [B, S, K, D] keys of every slot, same dtype as q; H a multiple of K, with the
            same head grouping as `attention`.
        v_cache: [B, S, K, D] values.
        kv_mask: bool or int [B, S], nonzero where the slot holds a real token.
        q_offset: int scalar (may be traced), the slot of query 0, the same for all rows.
        sm_scale: multiplier of q.k before the softmax; default 1/sqrt(D).
        window: optional sliding window W >= 1: query t also needs s > q_offset + t - W,
            by slot difference (the same as `attention`'s index difference when the cache
            row holds the same row of tokens).

    Returns:
        [B, T, H, D] in q.dtype. A query with no visible slot (a padding query whose earlier
        slots are all padding) gets exactly 0, as in `attention`.
    """
    B, T, H, D = q.shape
    S, K = k_cache.shape[1], k_cache.shape[2]
    if H % K != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K})")
    if k_cache.shape != (B, S, K, D) or v_cache.shape != (B, S, K, D):
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must both be "
                         f"[B, S, K, D] with B={B}, D={D}")
    if kv_mask.shape != (B, S):
        raise ValueError(f"kv_mask {kv_mask.shape} must be [B, S] = [{B}, {S}]")
    G = H // K
    if sm_scale is None:
        sm_scale = D ** -0.5

    _check_window(window, causal=True)
    causal_TS = _slot_causal_mask(q_offset + jnp.arange(T), S, window)
    mask_B11TS = ((kv_mask != 0)[:, None, :] & causal_TS[None, :, :])[:, None, None, :, :]

    q_BTKGD = q.reshape(B, T, K, G, D)
    scores_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_cache,
                              preferred_element_type=jnp.float32) * sm_scale
    probs_BKGTS = masked_softmax(scores_BKGTS, mask_B11TS)

    out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS.astype(v_cache.dtype), v_cache,
                           preferred_element_type=jnp.float32)
    return out_BTKGD.reshape(B, T, H, D).astype(q.dtype)


def decode_attention_reference(q, k_cache, v_cache, lengths, *, kv_mask=None, sm_scale=None):
    """One new query token per sequence against a KV cache, in plain jnp.

    The oracle of kernels/decode.py. Scores, softmax and the weighted sum of values
    are all float32.

    Args:
        q: [B, H, D] the new token's queries.
        k_cache, v_cache: [B, L, K, D] cached keys and values; H a multiple of K, query head
            h reads kv head h // (H // K).
        lengths: int [B], valid cache entries per sequence: query b sees positions
            0 .. lengths[b] - 1 (values outside [0, L] are clamped).
        kv_mask: optional int or bool [B, L]; where 0, a position below the length is hidden
            too (the left padding of a batch of prompts).
        sm_scale: multiplier of q.k before the softmax; default 1/sqrt(D).

    Returns:
        [B, H, D] in q.dtype; 0 for a sequence that sees no position.
    """
    B, H, D = q.shape
    L, K = k_cache.shape[1], k_cache.shape[2]
    if H % K != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({K})")
    G = H // K
    if sm_scale is None:
        sm_scale = D ** -0.5
    q_BKGD = q.reshape(B, K, G, D).astype(jnp.float32)
    scores_BKGL = jnp.einsum("bkgd,blkd->bkgl", q_BKGD, k_cache.astype(jnp.float32)) * sm_scale
    visible_BL = jnp.arange(L)[None, :] < jnp.clip(lengths, 0, L)[:, None]
    if kv_mask is not None:
        visible_BL = visible_BL & (kv_mask != 0)
    visible_B111L = visible_BL[:, None, None, :]
    # Finite fill and an explicit zero of the weights, as in `attention`: a sequence of
    # length 0 gets an all-zero row instead of 0/0.
    scores_BKGL = jnp.where(visible_B111L, scores_BKGL, jnp.finfo(jnp.float32).min)
    row_max_BKG1 = jnp.max(scores_BKGL, axis=-1, keepdims=True)
    weights_BKGL = jnp.where(visible_B111L, jnp.exp(scores_BKGL - row_max_BKG1), 0.0)
    denom_BKG1 = jnp.sum(weights_BKGL, axis=-1, keepdims=True)
    probs_BKGL = weights_BKGL / jnp.where(denom_BKG1 == 0.0, 1.0, denom_BKG1)
    out_BKGD = jnp.einsum("bkgl,blkd->bkgd", probs_BKGL, v_cache.astype(jnp.float32))
    return out_BKGD.reshape(B, H, D).astype(q.dtype)
