"""The open-model family options of ModelConfig, each against an independent reference:
LLaMA 3.1 RoPE scaling (by hand and against transformers), Qwen3's qk norm (a numpy forward
of one block), Mistral's sliding window (masks by hand, the model's training and decoding
paths, the cuDNN path's masking on CPU) and the Pallas path's refusal of a window."""
import dataclasses
import functools
import json
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax.kernels import reference
from instructjax.model import attention as attention_lib
from instructjax.model import cache as cache_lib
from instructjax.model import transformer as tm
from instructjax.model.config import ModelConfig, count_params

# The model tests' tiny config: GQA (4 query heads on 2 kv heads), qkv bias, untied head.
BASE = ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=48, max_seq_len=32, qkv_bias=True, tie_embeddings=False)
# With head_dim 8 and theta 1e4 the wavelengths are 6.3, 63, 628 and 6283: an original
# length of 64 (low band above 64, high band below 16) puts one in each of llama3's regimes.
LLAMA3 = dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
              rope_high_freq_factor=4.0, rope_original_max_len=64)
NEW_FIELDS = ("rope_scaling", "rope_scaling_factor", "rope_low_freq_factor",
              "rope_high_freq_factor", "rope_original_max_len", "qk_norm", "sliding_window")
# Same float32 math summed in another order (cached vs uncached, numpy vs XLA): a few ulps of
# unit-scale values; a wrong mask entry or a wrong norm moves them by 1e-2 or more.
SAME_MATH_TOL = dict(atol=1e-5, rtol=1e-5)
# float32 frequencies against a float64 formula: a few float32 ulps (2**-23 ~ 1.2e-7).
F32_FREQ_TOL = dict(rtol=1e-6, atol=0.0)


def normal(key, shape):
    # Flat draw reshaped: rank-3+ threefry compiles slowly on this CPU.
    return jax.random.normal(key, (int(np.prod(shape)),)).reshape(shape)


def random_tokens(seed, shape):
    flat = jax.random.randint(jax.random.key(seed), (int(np.prod(shape)),), 1, BASE.vocab_size)
    return flat.reshape(shape).astype(jnp.int32)


@functools.lru_cache(maxsize=None)
def params_for(cfg):
    return tm.init_params(cfg, jax.random.key(0))


@functools.lru_cache(maxsize=None)
def forward(cfg):
    return jax.jit(lambda params, tokens, positions, segment_ids: tm.Transformer(cfg).apply(
        {"params": params}, tokens, positions, segment_ids))


def left_padded_batch(T=12):
    """Tokens [3, T] with 3, 0 and 7 left pads, the mask, and positions cumsum(mask) - 1."""
    mask = np.ones((3, T), np.int32)
    mask[0, :3] = 0
    mask[2, :7] = 0
    tokens = jnp.asarray(np.asarray(random_tokens(1, (3, T))) * mask, jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    return tokens, jnp.asarray(mask), positions


# ---------------------------------------------------------------- config

def test_defaults_are_todays_model():
    cfg = BASE
    assert (cfg.rope_scaling, cfg.qk_norm, cfg.sliding_window) == ("none", False, 0)
    # Plain RoPE's frequencies, bit for bit the formula apply_rope used before the option.
    D = cfg.head_dim
    expected = 1.0 / (cfg.rope_theta ** (jnp.arange(D // 2, dtype=jnp.float32) * 2.0 / D))
    np.testing.assert_array_equal(tm.rope_inverse_frequencies(cfg), expected)
    params = params_for(cfg)
    assert set(params["layers"]["attn"]) == {"query", "key", "value", "out"}
    assert count_params(cfg) == sum(x.size for x in jax.tree.leaves(params))


def test_saved_configs_without_the_new_keys_still_load():
    old = {k: v for k, v in BASE.to_dict().items() if k not in NEW_FIELDS}
    assert ModelConfig.from_dict(old) == BASE
    new = BASE.replace(qk_norm=True, sliding_window=5, **LLAMA3)
    # Plain JSON values, so a checkpoint's metadata round-trips.
    assert ModelConfig.from_dict(json.loads(json.dumps(new.to_dict()))) == new


@pytest.mark.parametrize("changes,field", [
    (dict(rope_scaling="yarn"), "rope_scaling"),
    (dict(rope_scaling="llama3"), "rope_original_max_len"),
    ({**LLAMA3, "rope_original_max_len": -1}, "rope_original_max_len"),
    ({**LLAMA3, "rope_scaling_factor": 0.0}, "rope_scaling_factor"),
    ({**LLAMA3, "rope_high_freq_factor": 1.0}, "rope_high_freq_factor"),
    # A scaling parameter without rope_scaling="llama3" would be silently ignored.
    (dict(rope_scaling_factor=8.0), "rope_scaling_factor"),
    (dict(rope_original_max_len=8192), "rope_original_max_len"),
    (dict(sliding_window=-1), "sliding_window"),
    (dict(sliding_window=True), "sliding_window"),
    (dict(sliding_window=4, attention_impl="pallas"), "sliding_window"),
])
def test_invalid_family_options_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        BASE.replace(**changes)


def test_count_params_counts_the_qk_norm_scales():
    for scan in (True, False):
        cfg = BASE.replace(qk_norm=True, scan_layers=scan)
        shapes = jax.eval_shape(lambda cfg=cfg: tm.init_params(cfg, jax.random.key(0)))
        assert count_params(cfg) == sum(x.size for x in jax.tree.leaves(shapes))
    assert count_params(BASE.replace(qk_norm=True)) - count_params(BASE) == 2 * 2 * 8


# ---------------------------------------------------------------- llama3 RoPE scaling

def llama3_by_hand(head_dim, theta, factor, low, high, original):
    """float64 [D/2], frequency by frequency, from the three regimes' definitions."""
    out = []
    for i in range(head_dim // 2):
        freq = theta ** (-2.0 * i / head_dim)
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:  # turned many times in pretraining: kept
            out.append(freq)
        elif wavelength > original / low:  # never a full turn: stretched by the factor
            out.append(freq / factor)
        else:  # in between: a linear blend in original / wavelength
            blend = (original / wavelength - low) / (high - low)
            out.append((1 - blend) * freq / factor + blend * freq)
    return np.array(out)


def test_llama3_frequencies_match_the_formula_by_hand():
    cfg = BASE.replace(**LLAMA3)
    ours = np.asarray(tm.rope_inverse_frequencies(cfg))
    assert ours.dtype == np.float32 and ours.shape == (4,)
    np.testing.assert_allclose(ours, llama3_by_hand(8, 1e4, 8.0, 1.0, 4.0, 64), **F32_FREQ_TOL)
    plain = 1e4 ** (-np.arange(4) * 2 / 8)
    # One frequency of each regime: kept, blended (strictly between), divided by the factor.
    assert ours[0] == pytest.approx(plain[0], rel=1e-6)
    assert plain[1] / 8 < ours[1] < plain[1]
    np.testing.assert_allclose(ours[2:], plain[2:] / 8, rtol=1e-6)


# LLaMA 3.1 8B's published rope_scaling and theta, and a tiny case with all three regimes.
@pytest.mark.parametrize("head_dim,theta,factor,low,high,original", [
    (128, 500000.0, 8.0, 1.0, 4.0, 8192),
    (8, 10000.0, 8.0, 1.0, 4.0, 64),
    (64, 500000.0, 32.0, 1.0, 4.0, 8192),
])
def test_llama3_frequencies_match_transformers(head_dim, theta, factor, low, high, original):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is the reference implementation of llama3 RoPE")
    from transformers import modeling_rope_utils
    rope = dict(rope_type="llama3", rope_theta=theta, factor=factor, low_freq_factor=low,
                high_freq_factor=high, original_max_position_embeddings=original)
    hf_config = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2,
                                         head_dim=head_dim, max_position_embeddings=16 * original,
                                         rope_parameters=rope)
    hf_freq, attention_scaling = modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_config,
                                                                                   None)
    cfg = BASE.replace(head_dim=head_dim, rope_theta=theta, rope_scaling="llama3",
                       rope_scaling_factor=factor, rope_low_freq_factor=low,
                       rope_high_freq_factor=high, rope_original_max_len=original)
    ours = np.asarray(tm.rope_inverse_frequencies(cfg))
    # Both float32 from the same formula; torch's and XLA's pow may differ by an ulp.
    np.testing.assert_allclose(ours, hf_freq.numpy(), **F32_FREQ_TOL)
    assert attention_scaling == 1.0  # so our RoPE needs no cos/sin scale


def test_llama3_scaling_reaches_the_model():
    cfg = BASE.replace(**LLAMA3)
    tokens = random_tokens(2, (1, 16))
    positions = jnp.arange(16, dtype=jnp.int32)[None] + 40
    params = params_for(BASE)
    scaled = forward(cfg)(params, tokens, positions, None)
    plain = forward(BASE)(params, tokens, positions, None)
    assert np.max(np.abs(np.asarray(scaled) - np.asarray(plain))) > 1e-3


# ---------------------------------------------------------------- qk norm (Qwen3)

def numpy_one_block_forward(p, tokens, cfg):
    """float64 logits [B, T, V] of a 1-layer model (unrolled params), written out by hand."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
    blk, E, H, K, D = p["layers_0"], cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * scale

    def rope(x):  # rotate-half: (x_i, x_{i+D/2}) turned by t * theta**(-2i/D)
        angle = np.arange(x.shape[1])[:, None] * cfg.rope_theta ** (-np.arange(D // 2) * 2 / D)
        cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
        x1, x2 = x[..., :D // 2], x[..., D // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    x = p["embed"]["embedding"][tokens]
    h = rms(x, blk["attn_norm"]["scale"])
    a = blk["attn"]
    q = np.einsum("bte,ehd->bthd", h, a["query"]["kernel"]) + a["query"]["bias"]
    k = np.einsum("bte,ekd->btkd", h, a["key"]["kernel"]) + a["key"]["bias"]
    v = np.einsum("bte,ekd->btkd", h, a["value"]["kernel"]) + a["value"]["bias"]
    # Qwen3: each head normed over D after the projection, before RoPE.
    q, k = rope(rms(q, a["query_norm"]["scale"])), rope(rms(k, a["key_norm"]["scale"]))
    k, v = np.repeat(k, H // K, axis=2), np.repeat(v, H // K, axis=2)  # head h reads h // G
    T = tokens.shape[1]
    scores = np.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum("bhts,bshd->bthd", probs, v)
    x = x + np.einsum("bthd,hde->bte", attn, a["out"]["kernel"])
    h = rms(x, blk["mlp_norm"]["scale"])
    m = blk["mlp"]
    gate, up = h @ m["gate"]["kernel"], h @ m["up"]["kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ m["down"]["kernel"]
    return rms(x, p["final_norm"]["scale"]) @ p["lm_head"]["kernel"]


def test_qk_norm_block_matches_a_numpy_forward():
    cfg = BASE.replace(num_layers=1, qk_norm=True, scan_layers=False)
    params = params_for(cfg)
    attn = params["layers_0"]["attn"]
    assert attn["query_norm"]["scale"].shape == attn["key_norm"]["scale"].shape == (8,)
    # Init scales are ones; random ones (and a random bias) check which scale goes where.
    kq, kk, kb = jax.random.split(jax.random.key(3), 3)
    attn = {**attn, "query_norm": {"scale": 1 + 0.5 * normal(kq, (8,))},
            "key_norm": {"scale": 1 + 0.5 * normal(kk, (8,))},
            "query": {**attn["query"], "bias": 0.3 * normal(kb, (4, 8))}}
    params = {**params, "layers_0": {**params["layers_0"], "attn": attn}}
    tokens = random_tokens(4, (2, 9))
    ours = forward(cfg)(params, tokens, None, None)
    np.testing.assert_allclose(ours, numpy_one_block_forward(params, np.asarray(tokens), cfg),
                               **SAME_MATH_TOL)
    # The norms do something: without them (scales dropped) the logits move.
    plain = forward(cfg.replace(qk_norm=False))(
        {**params, "layers_0": {**params["layers_0"], "attn": {
            n: attn[n] for n in ("query", "key", "value", "out")}}}, tokens, None, None)
    assert np.max(np.abs(np.asarray(ours) - np.asarray(plain))) > 1e-3


def test_qk_norm_params_scan_layout_and_logical_names():
    cfg = BASE.replace(qk_norm=True)
    boxed = jax.eval_shape(lambda: tm.init_boxed_params(tm.Transformer(cfg), jax.random.key(0)))
    specs = nn.get_partition_spec(boxed)["layers"]["attn"]
    assert tuple(specs["query_norm"]["scale"]) == ("layers", "head_dim")
    assert tuple(specs["key_norm"]["scale"]) == ("layers", "head_dim")
    scanned = params_for(cfg)
    assert scanned["layers"]["attn"]["key_norm"]["scale"].shape == (2, 8)
    # The unrolled model runs the same math on the same (unstacked) params.
    tokens = random_tokens(5, (2, 7))
    unrolled = forward(cfg.replace(scan_layers=False))(tm.unstack_layer_params(scanned), tokens,
                                                       None, None)
    chex.assert_trees_all_close(unrolled, forward(cfg)(scanned, tokens, None, None),
                                **SAME_MATH_TOL)


# ---------------------------------------------------------------- sliding window (Mistral)

def test_window_mask_by_hand():
    # Row 0: one document; row 1: documents of 4 and 2 tokens, then 1 padding token.
    seg = jnp.array([[1] * 7, [1, 1, 1, 1, 2, 2, 0]], jnp.int32)
    mask = np.asarray(reference.make_attention_mask(seg, seg, True, window=3)).astype(int)
    # Query i sees key j when i - 3 < j <= i (and, in row 1, within its own document).
    np.testing.assert_array_equal(mask[0], [[1, 0, 0, 0, 0, 0, 0],
                                            [1, 1, 0, 0, 0, 0, 0],
                                            [1, 1, 1, 0, 0, 0, 0],
                                            [0, 1, 1, 1, 0, 0, 0],
                                            [0, 0, 1, 1, 1, 0, 0],
                                            [0, 0, 0, 1, 1, 1, 0],
                                            [0, 0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(mask[1], [[1, 0, 0, 0, 0, 0, 0],
                                            [1, 1, 0, 0, 0, 0, 0],
                                            [1, 1, 1, 0, 0, 0, 0],
                                            [0, 1, 1, 1, 0, 0, 0],
                                            [0, 0, 0, 0, 1, 0, 0],
                                            [0, 0, 0, 0, 1, 1, 0],
                                            [0, 0, 0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="causal"):
        reference.make_attention_mask(seg, seg, False, window=3)
    with pytest.raises(ValueError, match="window"):
        reference.make_attention_mask(seg, seg, True, window=0)


def numpy_window_attention(q, k, v, window):
    """float64 causal sliding-window attention, [B, T, H, D] with K == H, query by query."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros_like(q)
    for t in range(q.shape[1]):
        lo = max(0, t - window + 1)
        scores = np.einsum("bhd,bshd->bhs", q[:, t], k[:, lo:t + 1]) / math.sqrt(q.shape[-1])
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[:, t] = np.einsum("bhs,bshd->bhd", probs, v[:, lo:t + 1])
    return out


def test_window_attention_paths_match_a_numpy_loop():
    B, T, H, D, W = 2, 9, 2, 8, 4
    kq, kk, kv = jax.random.split(jax.random.key(6), 3)
    q, k, v = normal(kq, (B, T, H, D)), normal(kk, (B, T, H, D)), normal(kv, (B, T, H, D))
    expected = numpy_window_attention(q, k, v, W)
    ones = jnp.ones((B, T), jnp.int32)
    np.testing.assert_allclose(reference.attention(q, k, v, window=W), expected,
                               **SAME_MATH_TOL)
    np.testing.assert_allclose(reference.attention(q, k, v, segment_ids=ones, window=W),
                               expected, **SAME_MATH_TOL)
    # The decoding path by slot: the last 3 queries at slots 6..8 over the whole cache.
    np.testing.assert_allclose(reference.cached_attention(q[:, 6:], k, v, kv_mask=ones,
                                                          q_offset=6, window=W),
                               expected[:, 6:], **SAME_MATH_TOL)
    # The cuDNN path's masking (local_window_size unpacked, dense mask packed), run by XLA.
    for seg in (None, ones):
        out = attention_lib.cudnn_attention(q, k, v, segment_ids=seg, window=W,
                                            implementation="xla")
        np.testing.assert_allclose(out, expected, **SAME_MATH_TOL)


def test_window_at_least_the_length_changes_nothing():
    tokens, mask, positions = left_padded_batch()
    params = params_for(BASE)
    plain = forward(BASE)(params, tokens, positions, mask)
    # Same masks, so the same logits bit for bit.
    chex.assert_trees_all_equal(forward(BASE.replace(sliding_window=12))(
        params, tokens, positions, mask), plain)


def test_window_changes_only_queries_past_it():
    W = 3
    tokens = random_tokens(7, (2, 12))
    params = params_for(BASE)
    plain = np.asarray(forward(BASE)(params, tokens, None, None))
    windowed = np.asarray(forward(BASE.replace(sliding_window=W))(params, tokens, None, None))
    # Queries 0 .. W-1 see all their keys anyway; later ones lose the oldest.
    np.testing.assert_array_equal(windowed[:, :W], plain[:, :W])
    assert np.min(np.max(np.abs(windowed[:, W:] - plain[:, W:]), axis=-1)) > 1e-4


def test_one_layer_window_by_gradient():
    """With one layer, d logits[t] / d block-input[s] is 0 exactly unless t - W < s <= t."""
    W, T = 3, 8
    cfg = BASE.replace(num_layers=1, sliding_window=W)
    params, tokens, model = params_for(cfg), random_tokens(8, (1, T)), tm.Transformer(cfg)
    perturbations = {"embed_out": jnp.zeros((1, T, cfg.embed_dim))}

    @jax.jit
    def input_grad_norms(t):
        def logits_at_t(pert):
            logits = model.apply({"params": params, "perturbations": pert}, tokens)
            return jnp.sum(logits[0, t])
        return jnp.sum(jnp.abs(jax.grad(logits_at_t)(perturbations)["embed_out"][0]), -1)

    for t in range(T):
        seen = np.asarray(input_grad_norms(t)) != 0
        np.testing.assert_array_equal(seen, (np.arange(T) > t - W) & (np.arange(T) <= t))


@pytest.mark.parametrize("scan", [True, False])
def test_window_decoding_matches_the_full_forward(scan):
    cfg = BASE.replace(sliding_window=4, scan_layers=scan)
    params = params_for(cfg.replace(scan_layers=True))
    if not scan:
        params = tm.unstack_layer_params(params)
    tokens, mask, positions = left_padded_batch()
    full = forward(cfg)(params, tokens, positions, mask)

    @jax.jit
    def decode(params, x, pos, cache, index):
        return tm.Transformer(cfg).apply({"params": params}, x, pos, cache, index, mask,
                                         method="decode")

    # A 5-token prefill, then one token per call: the rollout's calls.
    cache = cache_lib.init_cache(cfg, batch=3, max_len=12)
    pieces = []
    for start, stop in [(0, 5)] + [(i, i + 1) for i in range(5, 12)]:
        logits, cache = decode(params, tokens[:, start:stop], positions[:, start:stop], cache,
                               start)
        pieces.append(logits)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, **SAME_MATH_TOL)


def test_pallas_refuses_a_window():
    with pytest.raises(ValueError, match=r"sliding_window.*pallas"):
        BASE.replace(attention_impl="pallas", sliding_window=4)
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"sliding_window.*pallas"):
        attention_lib.attention("pallas", q, q, q, None, window=2)
    with pytest.raises(ValueError, match=r"sliding_window.*pallas"):
        attention_lib.cached_attention("pallas", q[:, :1], q, q, jnp.ones((1, 4)), 0, window=2)


def test_all_family_options_together_run_both_paths():
    # Qwen3-like (qk norm, bias off) with LLaMA 3 scaling and a window: shapes and finiteness.
    cfg = dataclasses.replace(BASE, qk_norm=True, qkv_bias=False, sliding_window=5, **LLAMA3)
    params = params_for(cfg)
    tokens = random_tokens(9, (2, 10))
    full = forward(cfg)(params, tokens, None, None)
    cache = cache_lib.init_cache(cfg, batch=2, max_len=10)
    logits, _ = jax.jit(lambda p, c: tm.Transformer(cfg).apply(
        {"params": p}, tokens, None, c, 0, method="decode"))(params, cache)
    chex.assert_trees_all_close(logits, full, **SAME_MATH_TOL)
    assert np.all(np.isfinite(np.asarray(full)))
