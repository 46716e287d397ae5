"""LLaMA-style decoder-only Transformer in flax.linen: tokens [B, T] -> float32 logits [B, T, V].

Blocks are pre-norm: RMSNorm -> causal self-attention (RoPE, grouped-query heads) -> residual,
RMSNorm -> SwiGLU MLP -> residual; then a final RMSNorm and a tied or untied LM head.
Every parameter carries logical axis names, and activations are constrained by logical names
at block boundaries; both are no-ops until parallel/mesh.py activates a mesh and rules.

Letters: B batch, T length, H query heads, K kv heads, D head dim, E embed, F mlp,
V vocab, L layers.
"""
import functools
import importlib
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from instructjax.kernels import reference
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


def apply_rope(x, positions, theta):
    """Rotary position embedding, in the rotate-half layout of Hugging Face's LLaMA.

    Feature i is paired with feature i + D/2 and the pair is rotated by the angle
    position * theta**(-2i/D), so q.k after RoPE depends on positions only via their
    difference.

    Args:
        x: [B, T, N, D] queries or keys (N heads), any float dtype; D even.
        positions: int [B, T], position of each token within its own document.
        theta: RoPE base wavelength.

    Returns:
        [B, T, N, D] in x.dtype (the rotation itself is computed in float32).
    """
    D = x.shape[-1]
    half = D // 2
    inv_freq_d = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / D))
    angle_BTd = positions.astype(jnp.float32)[:, :, None] * inv_freq_d[None, None, :]
    sin_BT1d = jnp.sin(angle_BTd)[:, :, None, :]
    cos_BT1d = jnp.cos(angle_BTd)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos_BT1d - x2 * sin_BT1d, x2 * cos_BT1d + x1 * sin_BT1d],
                              axis=-1)
    return rotated.astype(x.dtype)


def cudnn_attention(q, k, v, *, segment_ids=None, causal=True, sm_scale=None,
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
        implementation: "cudnn" or "xla", passed to jax.nn.dot_product_attention.

    Returns:
        [B, T, H, D] in q.dtype; padding rows are 0, as in kernels/reference.py (cuDNN itself
        would return a uniform average there).
    """
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal,
                                            implementation=implementation)
    mask_B1TS = reference.make_attention_mask(segment_ids, segment_ids, causal)[:, None, :, :]
    out_BTHD = jax.nn.dot_product_attention(q, k, v, mask=mask_B1TS, scale=sm_scale,
                                            is_causal=causal, implementation=implementation)
    real_BT11 = (segment_ids != 0)[:, :, None, None]
    return jnp.where(real_BT11, out_BTHD, 0).astype(q.dtype)


def pallas_attention(q, k, v, *, segment_ids=None, causal=True, sm_scale=None):
    """Our Pallas flash-attention kernel, imported on first use (same signature as reference).

    On CPU the kernel runs in Pallas interpret mode, so the pallas path can be tested there.

    Raises:
        NotImplementedError: when kernels/flash_attention.py is not in this checkout.
    """
    name = "instructjax.kernels.flash_attention"
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        raise NotImplementedError(
            f"attention_impl='pallas' needs the Pallas kernel module {name} "
            "(kernels/flash_attention.py), which is not in this checkout; use "
            "attention_impl='xla' or 'cudnn'") from err
    return module.flash_attention(q, k, v, segment_ids=segment_ids, causal=causal,
                                  sm_scale=sm_scale,
                                  interpret=jax.default_backend() == "cpu")


# Attention functions by config name; all share reference.attention's signature.
ATTENTION_FNS = {
    "xla": reference.attention,
    "cudnn": cudnn_attention,
    "pallas": pallas_attention,
}


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32.

    Maps [..., E] to [..., E] in `dtype`; the scale param is [E] ('embed',).
    """

    eps: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        E = x.shape[-1]
        ones_init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
        scale_E = self.param("scale", ones_init, (E,), self.param_dtype)
        x = x.astype(jnp.float32)
        mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        scale = scale_E.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (E,))
        return (x * jax.lax.rsqrt(mean_square + self.eps) * scale).astype(self.dtype)


def _dtypes(cfg):
    """Compute and parameter dtypes as keyword arguments for flax layers."""
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _norm(cfg, name):
    return RMSNorm(cfg.norm_eps, name=name, **_dtypes(cfg))


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query heads: [B, T, E] -> [B, T, E].

    Params: query kernel [E, H, D], key and value kernels [E, K, D] (plus [H, D] / [K, D]
    biases when cfg.qkv_bias), out kernel [H, D, E].
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTE, positions_BT, segment_ids_BT):
        cfg = self.cfg

        def project(num_heads, heads_axis, name):
            return Projection((num_heads, cfg.head_dim), ("embed",), (heads_axis, "head_dim"),
                              cfg.qkv_bias, name=name, **_dtypes(cfg))(x_BTE)

        q_BTHD = apply_rope(project(cfg.num_heads, "heads", "query"), positions_BT,
                            cfg.rope_theta)
        k_BTKD = apply_rope(project(cfg.num_kv_heads, "kv_heads", "key"), positions_BT,
                            cfg.rope_theta)
        v_BTKD = project(cfg.num_kv_heads, "kv_heads", "value")
        q_BTHD = nn.with_logical_constraint(q_BTHD, _BTHD)
        k_BTKD = nn.with_logical_constraint(k_BTKD, _BTKD)
        v_BTKD = nn.with_logical_constraint(v_BTKD, _BTKD)
        # A KV cache for decoding slots in here: write k, v at the cache index and attend
        # over the cache instead of the current chunk only.
        out_BTHD = ATTENTION_FNS[cfg.attention_impl](q_BTHD, k_BTKD, v_BTKD,
                                                     segment_ids=segment_ids_BT, causal=True)
        out_BTHD = nn.with_logical_constraint(out_BTHD, _BTHD)
        return Projection((cfg.embed_dim,), ("heads", "head_dim"), ("embed",), False,
                          name="out", **_dtypes(cfg))(out_BTHD)


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
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTE, positions_BT, segment_ids_BT):
        x_BTE = nn.with_logical_constraint(x_BTE, _BTE)
        h_BTE = _norm(self.cfg, "attn_norm")(x_BTE)
        x_BTE = x_BTE + Attention(self.cfg, name="attn")(h_BTE, positions_BT, segment_ids_BT)
        h_BTE = _norm(self.cfg, "mlp_norm")(x_BTE)
        x_BTE = x_BTE + Mlp(self.cfg, name="mlp")(h_BTE)
        return nn.with_logical_constraint(x_BTE, _BTE), None


class Transformer(nn.Module):
    """Decoder-only language model.

    Params (scan_layers=True): embed/embedding [V, E]; layers/{attn_norm, attn/{query, key,
    value, out}, mlp_norm, mlp/{gate, up, down}} with a leading [L] axis on every leaf;
    final_norm/scale [E]; lm_head/kernel [E, V] when embeddings are untied. With
    scan_layers=False the blocks are layers_0 .. layers_{L-1} without the leading axis.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, *, return_hidden=False):
        """Next-token logits.

        Args:
            tokens: int32 [B, T] token ids, T <= cfg.max_seq_len.
            positions: int32 [B, T] position within each token's document (restarting at 0
                for each packed document); default 0..T-1 in every row.
            segment_ids: int32 [B, T] document id per token, 1, 2, ... within a row and
                0 for padding; tokens only attend within their own segment. Default (None)
                is one segment per row, run without a segment mask.
            return_hidden: also return the final-normed hidden states the LM head reads.

        Returns:
            float32 logits [B, T, V], or (logits, hidden [B, T, E] in cfg.dtype).
        """
        cfg = self.cfg
        B, T = tokens.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds cfg.max_seq_len={cfg.max_seq_len}")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, :], (B, T))

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
            x_BTE, _ = stack(cfg, name="layers")(x_BTE, positions, segment_ids)
        else:
            for i in range(cfg.num_layers):
                x_BTE, _ = block(cfg, name=f"layers_{i}")(x_BTE, positions, segment_ids)

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
        if return_hidden:
            return logits_BTV, hidden_BTE
        return logits_BTV


def init_params(cfg, rng, batch_shape=(1, 8)):
    """Freshly initialised parameters, with the logical-axis boxes removed.

    Args:
        cfg: ModelConfig.
        rng: a jax PRNG key.
        batch_shape: (B, T) of the dummy tokens used to trace the model (sizes don't matter
            for the params, only T <= cfg.max_seq_len).

    Returns:
        The params pytree (nested dicts of arrays in cfg.param_dtype), ready for
        `Transformer(cfg).apply({"params": params}, tokens)`.
    """
    tokens = jnp.zeros(batch_shape, jnp.int32)
    variables = jax.jit(Transformer(cfg).init)(rng, tokens)
    return nn.meta.unbox(variables["params"])


def logical_param_axes(cfg, batch_shape=(1, 8)):
    """Logical axis names of every parameter, without allocating any.

    Returns:
        A pytree shaped like init_params' result whose leaves are PartitionSpecs of logical
        names (e.g. P('layers', 'embed', 'heads', 'head_dim') for a scanned query kernel);
        parallel/mesh.py maps them to mesh axes.
    """
    tokens = jax.ShapeDtypeStruct(batch_shape, jnp.int32)
    abstract = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), tokens)
    return nn.get_partition_spec(abstract)["params"]


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
