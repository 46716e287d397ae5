"""LLaMA-style decoder-only Transformer in flax.linen: tokens [B, T] -> float32 logits [B, T, V].

Blocks are pre-norm: RMSNorm -> causal self-attention (RoPE, grouped-query heads) -> residual,
RMSNorm -> SwiGLU MLP -> residual; then a final RMSNorm and a tied or untied LM head.
Every parameter carries logical axis names, and activations are constrained by logical names
at block boundaries; both are no-ops until parallel/mesh.py activates a mesh and rules.

Letters: B batch, T length, H query heads, K kv heads, D head dim, E embed, F mlp,
V vocab, L layers.
"""
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from instructjax.model import attention as attention_lib
from instructjax.model.cache import CACHE_AXES, LAYER_CACHE_AXES, KVCache
from instructjax.model.config import ModelConfig

# Logical names of activations; parallel/mesh.py maps them to mesh axes.
_BTE = ("activation_batch", "activation_length", "activation_embed")
_BTHD = ("activation_batch", "activation_length", "activation_heads", None)
_BTKD = ("activation_batch", "activation_length", "activation_kv_heads", None)
_BTF = ("activation_batch", "activation_length", "activation_mlp")
_BTV = ("activation_batch", "activation_length", "activation_vocab")

# Remat policy by config name. None means no remat at all (every activation kept), which is
# not the same as nn.remat(policy=None); the other two are jax.checkpoint policies: "full"
# saves nothing and recomputes the whole block, "save_dots" keeps the weight matmuls'
# outputs and recomputes the rest (attention scores included, as their matmuls are batched).
_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _kernel_init(*names, num_in=1):
    """Fan-in scaled normal init carrying one logical axis name per kernel dim.

    The first `num_in` dims are contracted with the input. Values are drawn as a 2-D
    [fan_in, fan_out] matrix and reshaped: the same draws as a flat Dense, and the box keeps
    the full-rank names (flax's DenseGeneral boxes the flat draw and then fails to apply a
    rank-3 sharding constraint to it under a mesh).
    """
    base = nn.initializers.lecun_normal()

    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[:num_in])
        return base(key, (fan_in, math.prod(shape[num_in:])), dtype).reshape(shape)

    return nn.with_logical_partitioning(init, names)


class Projection(nn.Module):
    """A linear map contracting the last `len(in_names)` input dims with a named kernel.

    x [..., *in_shape] -> [..., *features]; kernel [*in_shape, *features] with logical names
    in_names + out_names; optional bias [*features].
    """

    features: tuple[int, ...]
    in_names: tuple[str, ...]
    out_names: tuple[str, ...]
    use_bias: bool
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        num_in = len(self.in_names)
        in_shape = x.shape[x.ndim - num_in:]
        kernel = self.param("kernel", _kernel_init(*self.in_names, *self.out_names, num_in=num_in),
                            tuple(in_shape) + tuple(self.features), self.param_dtype)
        contract = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
        if self.use_bias:
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, self.out_names)
            bias = self.param("bias", bias_init, tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
        return y


def rope_frequencies(head_dim, theta):
    """Plain RoPE's inverse frequencies: float32 [D/2], entry i = theta**(-2i/D)."""
    return 1.0 / (theta ** (jnp.arange(head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim))


def llama3_scaled_frequencies(inv_freq_d, factor, low_freq_factor, high_freq_factor,
                              original_max_len):
    """LLaMA 3.1's rescaling of RoPE's inverse frequencies (float32 [D/2] -> float32 [D/2]).

    The formula of transformers' `_compute_llama3_parameters` (modeling_rope_utils.py): with
    wavelength w = 2*pi / f, frequencies with w > original_max_len / low_freq_factor are
    divided by `factor` (they never completed a turn in pretraining, so stretch them), those
    with w < original_max_len / high_freq_factor are kept, and in between the result blends
    f / factor and f linearly in original_max_len / w. Its attention scaling is 1.
    """
    wavelen_d = 2 * math.pi / inv_freq_d
    low_freq_wavelen = original_max_len / low_freq_factor
    high_freq_wavelen = original_max_len / high_freq_factor
    scaled_d = jnp.where(wavelen_d > low_freq_wavelen, inv_freq_d / factor, inv_freq_d)
    smooth_d = ((original_max_len / wavelen_d - low_freq_factor)
                / (high_freq_factor - low_freq_factor))
    smoothed_d = (1 - smooth_d) * scaled_d / factor + smooth_d * scaled_d
    is_medium_d = ~(wavelen_d < high_freq_wavelen) & ~(wavelen_d > low_freq_wavelen)
    return jnp.where(is_medium_d, smoothed_d, scaled_d)


def rope_inverse_frequencies(cfg):
    """The inverse frequencies RoPE rotates by under `cfg`: float32 [cfg.head_dim / 2]."""
    inv_freq_d = rope_frequencies(cfg.head_dim, cfg.rope_theta)
    if cfg.rope_scaling == "llama3":
        inv_freq_d = llama3_scaled_frequencies(
            inv_freq_d, cfg.rope_scaling_factor, cfg.rope_low_freq_factor,
            cfg.rope_high_freq_factor, cfg.rope_original_max_len)
    return inv_freq_d


def apply_rope(x, positions, inv_freq_d):
    """Rotary position embedding, in the rotate-half layout of Hugging Face's LLaMA.

    Feature i is paired with feature i + D/2 and the pair is rotated by the angle
    position * inv_freq_d[i], so q.k after RoPE depends on positions only via their
    difference.

    Args:
        x: [B, T, N, D] queries or keys (N heads), any float dtype; D even.
        positions: int [B, T], position of each token within its own document.
        inv_freq_d: float32 [D/2] inverse frequencies (`rope_inverse_frequencies(cfg)`, or
            `rope_frequencies(D, theta)` for plain RoPE).

    Returns:
        [B, T, N, D] in x.dtype (the rotation itself is computed in float32).
    """
    if inv_freq_d.shape != (x.shape[-1] // 2,):
        raise ValueError(f"inv_freq_d {inv_freq_d.shape} must be [D/2] for x {x.shape}")
    angle_BTd = positions.astype(jnp.float32)[:, :, None] * inv_freq_d[None, None, :]
    sin_BT1d = jnp.sin(angle_BTd)[:, :, None, :]
    cos_BT1d = jnp.cos(angle_BTd)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BT1d - x2 * sin_BT1d, x2 * cos_BT1d + x1 * sin_BT1d],
                              axis=-1)
    return rotated.astype(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32.

    Maps [..., E] to [..., E] in `dtype`; the scale param is [E] with logical name
    `axis_name` ("embed" for the residual stream, "head_dim" for the qk norms).
    """

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        E = x.shape[-1]
        ones_init = nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,))
        scale_E = self.param("scale", ones_init, (E,), self.param_dtype)
        x = x.astype(jnp.float32)
        mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        scale = scale_E.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (E,))
        return (x * jax.lax.rsqrt(mean_square + self.eps) * scale).astype(self.dtype)


def _dtypes(cfg):
    """Compute and parameter dtypes as keyword arguments for flax layers."""
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _norm(cfg, name, axis_name="embed"):
    return RMSNorm(cfg.norm_eps, name=name, axis_name=axis_name, **_dtypes(cfg))


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query heads: [B, T, E] -> [B, T, E].

    Params: query kernel [E, H, D], key and value kernels [E, K, D] (plus [H, D] / [K, D]
    biases when cfg.qkv_bias), out kernel [H, D, E]; query_norm/scale and key_norm/scale
    [D] when cfg.qk_norm (each head of q and k RMS-normed before RoPE, as in Qwen3).
    cfg.sliding_window limits how far back each query sees (model/attention.py).

    Decoding (`kv_cache` given): the chunk's keys and values go into a copy of this layer's
    cache slice at slots cache_index .. cache_index + T - 1, the queries attend over the
    whole slice (kv_mask and slot order decide what each query sees), and the chunk itself is
    returned for the caller to store. model/attention.py picks the implementation of either
    path from cfg.attention_impl.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTE, positions_BT, segment_ids_BT, kv_cache=None, cache_index=None,
                 kv_mask_BS=None):
        """Returns (out [B, T, E], KVCache chunk [B, T, K, D] when kv_cache is given else None).

        kv_cache: KVCache slice [B, S, K, D] of this layer; cache_index: int scalar, the slot
        of the chunk's first token; kv_mask_BS: [B, S], 1 where a slot holds a real token.
        """
        cfg = self.cfg

        def project(num_heads, heads_axis, name):
            return Projection((num_heads, cfg.head_dim), ("embed",), (heads_axis, "head_dim"),
                              cfg.qkv_bias, name=name, **_dtypes(cfg))(x_BTE)

        q_BTHD = project(cfg.num_heads, "heads", "query")
        k_BTKD = project(cfg.num_kv_heads, "kv_heads", "key")
        v_BTKD = project(cfg.num_kv_heads, "kv_heads", "value")
        if cfg.qk_norm:
            q_BTHD = _norm(cfg, "query_norm", "head_dim")(q_BTHD)
            k_BTKD = _norm(cfg, "key_norm", "head_dim")(k_BTKD)
        inv_freq_d = rope_inverse_frequencies(cfg)
        q_BTHD = apply_rope(q_BTHD, positions_BT, inv_freq_d)
        k_BTKD = apply_rope(k_BTKD, positions_BT, inv_freq_d)
        window = cfg.sliding_window or None
        q_BTHD = nn.with_logical_constraint(q_BTHD, _BTHD)
        k_BTKD = nn.with_logical_constraint(k_BTKD, _BTKD)
        v_BTKD = nn.with_logical_constraint(v_BTKD, _BTKD)
        if kv_cache is None:
            out_BTHD = attention_lib.attention(cfg.attention_impl, q_BTHD, k_BTKD, v_BTKD,
                                               segment_ids_BT, window)
            chunk = None
        else:
            chunk = KVCache(k=k_BTKD, v=v_BTKD)
            # Only the chunk leaves this layer: the caller writes all layers' chunks into the
            # cache at once, instead of every step rewriting every layer's whole slice.
            merged = kv_cache.write(chunk, cache_index)
            k_BSKD = nn.with_logical_constraint(merged.k, LAYER_CACHE_AXES)
            v_BSKD = nn.with_logical_constraint(merged.v, LAYER_CACHE_AXES)
            k_BSKD, v_BSKD = k_BSKD.astype(q_BTHD.dtype), v_BSKD.astype(q_BTHD.dtype)
            out_BTHD = attention_lib.cached_attention(cfg.attention_impl, q_BTHD, k_BSKD, v_BSKD,
                                                      kv_mask_BS, cache_index, window)
        out_BTHD = nn.with_logical_constraint(out_BTHD, _BTHD)
        out_BTE = Projection((cfg.embed_dim,), ("heads", "head_dim"), ("embed",), False,
                             name="out", **_dtypes(cfg))(out_BTHD)
        return out_BTE, chunk


class Mlp(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)), [B, T, E] -> [B, T, E].

    Params: gate and up kernels [E, F] ('embed', 'mlp'), down kernel [F, E] ('mlp', 'embed').
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTE):
        cfg = self.cfg
        up = functools.partial(Projection, (cfg.mlp_dim,), ("embed",), ("mlp",), False,
                               **_dtypes(cfg))
        gate_BTF = up(name="gate")(x_BTE)
        up_BTF = up(name="up")(x_BTE)
        hidden_BTF = nn.with_logical_constraint(nn.silu(gate_BTF) * up_BTF, _BTF)
        return Projection((cfg.embed_dim,), ("mlp",), ("embed",), False, name="down",
                          **_dtypes(cfg))(hidden_BTF)


class Block(nn.Module):
    """One pre-norm decoder block, [B, T, E] -> ([B, T, E], None).

    It returns a (carry, output) pair so the same module works under nn.scan and in a loop.
    When decoding (kv_cache given, see Attention) the output is the layer's new KVCache
    chunk [B, T, K, D], which nn.scan stacks into [L, B, T, K, D].
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTE, positions_BT, segment_ids_BT, kv_cache=None, cache_index=None,
                 kv_mask_BS=None):
        x_BTE = nn.with_logical_constraint(x_BTE, _BTE)
        h_BTE = _norm(self.cfg, "attn_norm")(x_BTE)
        attn_BTE, chunk = Attention(self.cfg, name="attn")(h_BTE, positions_BT, segment_ids_BT,
                                                           kv_cache, cache_index, kv_mask_BS)
        x_BTE = x_BTE + attn_BTE
        h_BTE = _norm(self.cfg, "mlp_norm")(x_BTE)
        x_BTE = x_BTE + Mlp(self.cfg, name="mlp")(h_BTE)
        return nn.with_logical_constraint(x_BTE, _BTE), chunk


class Transformer(nn.Module):
    """Decoder-only language model, with one entry point per use.

      __call__(tokens, positions=None, segment_ids=None)     -> logits [B, T, V] float32
      hidden_states(tokens, positions=None, segment_ids=None) -> hidden [B, T, E] cfg.dtype
      logits_and_hidden(tokens, positions=None, segment_ids=None) -> both, from one pass
      decode(tokens, positions, cache, cache_index, kv_mask=None) -> (logits, new KVCache)

    `Transformer(cfg).apply({"params": p}, tokens)` gives logits; the other entries are
    `apply(..., method="decode")` etc., or plain calls on a child module inside a parent's
    compact method (model/heads.py). All share one param tree: every entry runs the same
    layers under the same names, the LM head included.

    Params (scan_layers=True): embed/embedding [V, E]; layers/{attn_norm, attn/{query, key,
    value, out, [query_norm, key_norm]}, mlp_norm, mlp/{gate, up, down}} with a leading [L]
    axis on every leaf; final_norm/scale [E]; lm_head/kernel [E, V] when embeddings are
    untied. With scan_layers=False the blocks are layers_0 .. layers_{L-1} without the
    leading axis.
    """

    cfg: ModelConfig

    def __call__(self, tokens, positions=None, segment_ids=None):
        """Next-token logits of whole rows (training, scoring, PPO's log-probs).

        Args:
            tokens: int32 [B, T] token ids, T <= cfg.max_seq_len.
            positions: int32 [B, T] position within each token's document (restarting at 0
                for each packed document); default 0..T-1 in every row. With left-padded
                rows pass cumsum(mask) - 1 (clipped at 0): RoPE must see each row's own
                positions.
            segment_ids: int32 [B, T] document id per token, 1, 2, ... within a row and
                0 for padding; tokens only attend within their own segment. Default (None)
                is one segment per row, run without a segment mask.

        Returns:
            float32 logits [B, T, V].
        """
        logits_BTV, _, _ = self._forward(tokens, positions, segment_ids)
        return logits_BTV

    def hidden_states(self, tokens, positions=None, segment_ids=None):
        """The final-normed hidden states the LM head reads, for scalar heads.

        Arguments as in `__call__`. The LM head still runs, so that init through this entry
        creates the same params; under jit XLA drops its unused logits.

        Returns:
            [B, T, E] in cfg.dtype.
        """
        _, hidden_BTE, _ = self._forward(tokens, positions, segment_ids)
        return hidden_BTE

    def logits_and_hidden(self, tokens, positions=None, segment_ids=None):
        """`__call__`'s logits and `hidden_states`' hidden states from one forward pass.

        Arguments as in `__call__`.

        Returns:
            (float32 logits [B, T, V], hidden [B, T, E] in cfg.dtype).
        """
        logits_BTV, hidden_BTE, _ = self._forward(tokens, positions, segment_ids)
        return logits_BTV, hidden_BTE

    def decode(self, tokens, positions, cache, cache_index, kv_mask=None):
        """Next-token logits of T new tokens against a KV cache (prefill, then steps).

        The T tokens take slots cache_index .. cache_index + T - 1 (their keys and values
        are written there), and each attends to the slots up to its own that kv_mask marks
        real. Prefill is one call with the whole prompt at cache_index 0; then one call per
        new token.

        Args:
            tokens: int32 [B, T] token ids.
            positions: int32 [B, T] RoPE positions (cumsum(mask) - 1 for left-padded
                prompts), or None for cache_index + 0..T-1 in every row.
            cache: KVCache [L, B, S, K, D] (model/cache.py), S <= cfg.max_seq_len.
            cache_index: int32 scalar (may be traced), the slot of tokens[:, 0], the same for
                all rows; cache_index + T must not exceed S.
            kv_mask: int or bool [B, S], 1 where a slot holds (or will hold) a real token,
                0 for padding; default all ones.

        Returns:
            (float32 logits [B, T, V], the KVCache with the T tokens' keys and values
            written).
        """
        _check_cache_args(self.cfg, tokens, cache, cache_index, kv_mask)
        if kv_mask is None:
            kv_mask = jnp.ones((tokens.shape[0], cache.max_len), jnp.int32)
        logits_BTV, _, cache = self._forward(tokens, positions, None, cache, cache_index,
                                             kv_mask)
        return logits_BTV, cache

    @nn.compact
    def _forward(self, tokens, positions, segment_ids, cache=None, cache_index=None,
                 kv_mask=None):
        """The one forward pass behind every entry: (logits, hidden, cache or None).

        Without a cache it runs the training stack (`_train_layers`); with one, the decoding
        stack (`_decode_layers`), whose arguments `decode` has checked.
        """
        cfg = self.cfg
        B, T = tokens.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds cfg.max_seq_len={cfg.max_seq_len}")
        if positions is None:
            offset = 0 if cache is None else cache_index
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :] + offset,
                                         (B, T))

        # With E**-0.5 the tied head's initial logits have unit scale (the final norm makes
        # the hidden state's entries ~1).
        embedding_init = nn.with_logical_partitioning(
            nn.initializers.normal(cfg.embed_dim ** -0.5), ("vocab", "embed"))
        embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, embedding_init=embedding_init,
                         name="embed", **_dtypes(cfg))
        x_BTE = embed(tokens)
        # Gradients w.r.t. the blocks' continuous input (the causality test) come from
        # passing {"perturbations": {"embed_out": zeros [B, T, E]}} to apply. Only then is
        # it added, so init never creates a batch-shaped variable.
        if self.has_variable("perturbations", "embed_out"):
            x_BTE = self.perturb("embed_out", x_BTE)
        x_BTE = nn.with_logical_constraint(x_BTE, _BTE)

        if cache is not None:
            x_BTE, cache = self._decode_layers(x_BTE, positions, cache, cache_index, kv_mask)
        else:
            x_BTE = self._train_layers(x_BTE, positions, segment_ids)

        hidden_BTE = _norm(cfg, "final_norm")(x_BTE)
        # The head accumulates in float32 even under bf16 compute: PPO's probability ratios
        # need log-probs finer than bf16 logits give.
        if cfg.tie_embeddings:
            embedding_VE = embed.embedding.astype(jnp.dtype(cfg.dtype))
            logits_BTV = jnp.einsum("bte,ve->btv", hidden_BTE, embedding_VE,
                                    preferred_element_type=jnp.float32)
        else:
            f32_dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
            logits_BTV = nn.Dense(cfg.vocab_size, use_bias=False,
                                  kernel_init=_kernel_init("embed", "vocab"), dot_general=f32_dot,
                                  name="lm_head", **_dtypes(cfg))(hidden_BTE)
        logits_BTV = nn.with_logical_constraint(logits_BTV.astype(jnp.float32), _BTV)
        return logits_BTV, hidden_BTE, cache

    def _train_layers(self, x_BTE, positions_BT, segment_ids_BT):
        """The block stack of the training path (scanned or unrolled, remat per config)."""
        cfg = self.cfg
        block = Block
        policy = _REMAT_POLICIES[cfg.remat_policy]
        if cfg.remat_policy != "none":
            # Under scan the loop boundary already keeps XLA from merging the recomputation
            # into the forward pass; the CSE-preventing barriers are only needed unrolled.
            block = nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x_BTE, _ = stack(cfg, name="layers")(x_BTE, positions_BT, segment_ids_BT)
        else:
            for i in range(cfg.num_layers):
                x_BTE, _ = block(cfg, name=f"layers_{i}")(x_BTE, positions_BT, segment_ids_BT)
        return x_BTE

    def _decode_layers(self, x_BTE, positions_BT, cache, cache_index, kv_mask_BS):
        """The block stack against a KV cache: (x [B, T, E], cache with the chunk written).

        The same Block modules under the same names as the training path, so the param tree
        is the same; without remat, as decoding takes no gradients.
        """
        cfg = self.cfg
        if cfg.scan_layers:
            # in_axes=0 on the cache gives each block its layer's [B, S, K, D] slice; the
            # blocks' chunks come back stacked as [L, B, T, K, D].
            stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                            length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x_BTE, chunks = stack(cfg, name="layers")(x_BTE, positions_BT, None, cache,
                                                      cache_index, kv_mask_BS)
        else:
            per_layer = []
            for i in range(cfg.num_layers):
                layer_cache = KVCache(k=cache.k[i], v=cache.v[i])
                x_BTE, chunk = Block(cfg, name=f"layers_{i}")(x_BTE, positions_BT, None,
                                                              layer_cache, cache_index,
                                                              kv_mask_BS)
                per_layer.append(chunk)
            chunks = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
        cache = cache.write(chunks, cache_index)
        cache = KVCache(k=nn.with_logical_constraint(cache.k, CACHE_AXES),
                        v=nn.with_logical_constraint(cache.v, CACHE_AXES))
        return x_BTE, cache


def _check_cache_args(cfg, tokens, cache, cache_index, kv_mask):
    """Static checks of a decoding call's arguments (shapes only; the index may be traced)."""
    B, T = tokens.shape
    expected = (cfg.num_layers, B, cache.max_len, cfg.num_kv_heads, cfg.head_dim)
    if cache.k.shape != expected or cache.v.shape != expected:
        raise ValueError(f"cache k {cache.k.shape} / v {cache.v.shape} must be [L, B, S, K, D] "
                         f"= {expected}")
    if cache.max_len > cfg.max_seq_len:
        raise ValueError(f"cache length {cache.max_len} exceeds "
                         f"cfg.max_seq_len={cfg.max_seq_len}")
    if T > cache.max_len:
        raise ValueError(f"{T} tokens do not fit a cache of {cache.max_len} slots")
    if cache_index is None:
        raise ValueError("decoding with a cache needs cache_index (the slot of tokens[:, 0])")
    if kv_mask is not None and kv_mask.shape != (B, cache.max_len):
        raise ValueError(f"kv_mask {kv_mask.shape} must be [B, S] = [{B}, {cache.max_len}]")


def init_boxed_params(module, rng, batch_shape=(1, 8)):
    """`module.init` on dummy tokens: fresh params still in their logical-partitioning boxes.

    The one way every model here is initialised (Transformer, RewardModel, the actor-critic
    modules: all take int32 tokens [B, T] first). The boxes carry each param's logical axis
    names (nn.get_partition_spec reads them) for sharded creation (train/state.py);
    nn.meta.unbox strips them.

    Args:
        module: a flax module called as module(tokens).
        rng: a jax PRNG key.
        batch_shape: (B, T) of the int32 dummy tokens (sizes don't matter for the params,
            only T <= cfg.max_seq_len).

    Returns:
        The "params" collection: nested dicts of boxed arrays (nn.LogicallyPartitioned).
    """
    return module.init(rng, jnp.zeros(batch_shape, jnp.int32))["params"]


def init_params(cfg, rng, batch_shape=(1, 8)):
    """Freshly initialised Transformer(cfg) parameters, with the logical-axis boxes removed.

    Args:
        cfg: ModelConfig.
        rng: a jax PRNG key.
        batch_shape: as in init_boxed_params.

    Returns:
        The params pytree (nested dicts of arrays in cfg.param_dtype), ready for
        `Transformer(cfg).apply({"params": params}, tokens)`.
    """
    init = functools.partial(init_boxed_params, Transformer(cfg), batch_shape=batch_shape)
    return nn.meta.unbox(jax.jit(init)(rng))


_LAYER_NAME = re.compile(r"layers_(\d+)")


def stack_layer_params(params):
    """Unrolled params (layers_0 .. layers_{L-1}) -> scanned params (layers, leading [L] axis).

    Works on unboxed params (init_params' output), e.g. to load a checkpoint of one layout
    into the other; the other top-level entries are kept as they are.
    """
    index = {int(m.group(1)): name for name in params if (m := _LAYER_NAME.fullmatch(name))}
    if not index or sorted(index) != list(range(len(index))):
        raise ValueError(f"expected layers_0 .. layers_N-1 in params, got {sorted(params)}")
    out = {name: p for name, p in params.items() if not _LAYER_NAME.fullmatch(name)}
    layers = [params[index[i]] for i in range(len(index))]
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return out


def unstack_layer_params(params):
    """Scanned params (layers with a leading [L] axis) -> unrolled params (layers_0 ..)."""
    out = {name: p for name, p in params.items() if name != "layers"}
    num_layers = jax.tree.leaves(params["layers"])[0].shape[0]
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out
