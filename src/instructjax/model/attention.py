"""The attention call of the model's layers, by `ModelConfig.attention_impl`.

Two entry points, one per use, both after RoPE and on grouped-query heads:
  `attention`         training / scoring: causal self-attention over a whole row, with
                      segment ids for packing ("xla", "cudnn" or "pallas");
  `cached_attention`  decoding: new queries over a layer's KV cache slice.
Every implementation has the semantics of kernels/reference.py.

Letters: B batch, T query length, S key length (cache slots), H query heads, K kv heads,
D head dim.
"""
import jax
import jax.numpy as jnp

from instructjax.kernels import decode_attention, flash_attention, reference


def _interpret():
    # CPU has no compiled Pallas backend: the kernels run in the interpreter there, which is
    # also what lets the tests run the pallas paths.
    return jax.default_backend() == "cpu"


def cudnn_attention(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, window=None,
                    implementation="cudnn"):
    """jax.nn.dot_product_attention (cuDNN flash attention) with our segment-id semantics.

    cuDNN's fused attention has no segment ids, so packed rows get a dense [B, 1, T, T]
    boolean mask built from them (O(T^2) memory, the price of packing on this path);
    unpacked calls (segment_ids=None) use the pure causal mask and skip that cost. cuDNN
    needs bf16/fp16 inputs on a GPU; `implementation="xla"` runs the same masking anywhere,
    which is how the tests check it on CPU.

    Args:
        q: [B, T, H, D]; k, v: [B, S, K, D] with H % K == 0.
        segment_ids: optional int [B, T] (T == S), 0 = padding.
        causal: causal masking (T == S).
        sm_scale: default 1/sqrt(D).
        window: optional sliding window W >= 1 (needs causal): query t sees keys
            t - W < s <= t. Unpacked, cuDNN's own sliding window (local_window_size); packed,
            folded into the dense mask.
        implementation: "cudnn" or "xla", passed to jax.nn.dot_product_attention.

    Returns:
        [B, T, H, D] in q.dtype; padding rows are 0, as in kernels/reference.py (cuDNN itself
        would return a uniform average there).
    """
    if window is not None and not causal:
        raise ValueError("a sliding window needs causal=True")
    if segment_ids is None:
        # (left, right) = (W - 1, 0) keeps keys s >= t - (W - 1), i.e. s > t - W.
        local_window = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal,
                                            local_window_size=local_window,
                                            implementation=implementation)
    mask_BTS = reference.make_attention_mask(segment_ids, segment_ids, causal, window=window)
    mask_B1TS = mask_BTS[:, None, :, :]
    out_BTHD = jax.nn.dot_product_attention(q, k, v, mask=mask_B1TS, scale=sm_scale,
                                            is_causal=causal, implementation=implementation)
    real_BT11 = (segment_ids != 0)[:, :, None, None]
    return jnp.where(real_BT11, out_BTHD, 0).astype(q.dtype)


def attention(impl, q_BTHD, k_BTKD, v_BTKD, segment_ids_BT, window=None):
    """Causal self-attention of a whole row, through the implementation `impl`.

    Args:
        impl: ModelConfig.attention_impl: "xla" (kernels/reference.py under XLA), "cudnn"
            (`cudnn_attention`) or "pallas" (kernels/flash.py; interpret mode on CPU).
        q_BTHD: [B, T, H, D] queries; k_BTKD, v_BTKD: [B, T, K, D] keys and values, same
            dtype; H % K == 0.
        segment_ids_BT: int [B, T] document ids, 0 = padding (sees and is seen by nothing);
            None = one segment per row, without a segment mask.
        window: ModelConfig.sliding_window as None (no window) or W >= 1: query t sees
            keys t - W < s <= t by index in the row. "pallas" refuses it.

    Returns:
        [B, T, H, D] in q's dtype.
    """
    _refuse_pallas_window(impl, window)
    kwargs = dict(segment_ids=segment_ids_BT, causal=True, window=window)
    if impl == "xla":
        return reference.attention(q_BTHD, k_BTKD, v_BTKD, **kwargs)
    if impl == "cudnn":
        return cudnn_attention(q_BTHD, k_BTKD, v_BTKD, **kwargs)
    if impl == "pallas":
        return flash_attention(q_BTHD, k_BTKD, v_BTKD, interpret=_interpret(),
                               segment_ids=segment_ids_BT, causal=True)
    raise ValueError(f"attention_impl={impl!r}; valid: 'xla', 'cudnn', 'pallas'")


def cached_attention(impl, q_BTHD, k_BSKD, v_BSKD, kv_mask_BS, cache_index, window=None):
    """T new queries at slots cache_index .. cache_index + T - 1 over one layer's KV cache.

    Query t of row b sees slot s when kv_mask_BS[b, s] is set and s <= cache_index + t
    (kernels/reference.cached_attention). Single-token steps with impl="pallas" run the
    Pallas decode kernel (kernels/decode.py), the rollout's per-token loop; prefill chunks
    and the other impls use the reference.

    Args:
        impl: ModelConfig.attention_impl.
        q_BTHD: [B, T, H, D] the new tokens' queries.
        k_BSKD, v_BSKD: [B, S, K, D] the layer's cache with this call's keys and values
            already written, in q's dtype.
        kv_mask_BS: int or bool [B, S], nonzero where a slot holds a real token.
        cache_index: int32 scalar (may be traced), the slot of the first new token.
        window: None or a sliding window W >= 1: query t also needs
            s > cache_index + t - W (by slot). "pallas" refuses it.

    Returns:
        [B, T, H, D] in q's dtype.
    """
    _refuse_pallas_window(impl, window)
    if impl == "pallas" and q_BTHD.shape[1] == 1:
        B = q_BTHD.shape[0]
        # The token at slot cache_index sees slots 0 .. cache_index, less the masked ones.
        lengths_B = jnp.full((B,), cache_index + 1, jnp.int32)
        out_BHD = decode_attention(q_BTHD[:, 0], k_BSKD, v_BSKD, lengths_B, kv_mask=kv_mask_BS,
                                   interpret=_interpret())
        return out_BHD[:, None]
    return reference.cached_attention(q_BTHD, k_BSKD, v_BSKD, kv_mask=kv_mask_BS,
                                      q_offset=cache_index, window=window)


def _refuse_pallas_window(impl, window):
    # The flash and decode kernels have no window; ignoring it would attend too far back.
    if impl == "pallas" and window is not None:
        raise ValueError(f"sliding_window={window} is not supported by attention_impl='pallas' "
                         f"(its flash and decode kernels have no window); use 'xla' or 'cudnn'")
