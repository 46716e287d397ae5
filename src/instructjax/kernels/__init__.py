"""Attention kernels: Pallas flash attention, Pallas decode attention, and their plain-jnp oracle.

    flash_attention(q, k, v, *, segment_ids=None, causal=True, sm_scale=None, interpret=False)
        q [B, T, H, D], k / v [B, S, K, D] -> [B, T, H, D] in q.dtype (flash.py)
    decode_attention(q, k_cache, v_cache, lengths, *, kv_mask=None, interpret=False)
        q [B, H, D], caches [B, L, K, D] -> [B, H, D] in q.dtype (decode.py)
    reference_attention, decode_attention_reference, cached_attention
        the same semantics in plain jnp (reference.py): the `xla` attention of the model,
        and what the kernels are tested against

The modules are named apart from the functions (flash.py, not flash_attention.py) so that
`instructjax.kernels.flash_attention` is always the function, whichever submodules have
been imported.
"""
from instructjax.kernels.decode import decode_attention
from instructjax.kernels.flash import BlockSizes, flash_attention
from instructjax.kernels.reference import attention as reference_attention
from instructjax.kernels.reference import cached_attention, decode_attention_reference

__all__ = [
    "BlockSizes",
    "cached_attention",
    "decode_attention",
    "decode_attention_reference",
    "flash_attention",
    "reference_attention",
]
