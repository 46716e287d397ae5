"""A small random model of an open family as a Hugging Face directory, made locally.

For trying the open-model commands without downloading anything, and for the tests: a
tokenizer of the family's shape (special tokens, chat template, EOS ids) trained on given
texts, and random weights of the family's features (Qwen2: qkv bias and tied embeddings;
Qwen3: q/k norms; LLaMA 3: llama3 RoPE scaling; Mistral: a sliding window), written with
`save_hf` so that transformers and `load_hf` both read it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np

from instructjax.model.config import ModelConfig

# Family -> (tokenizer family of data/tokenizer_files.py, ModelConfig features).
FAMILY_FEATURES = {
    "qwen2": ("qwen2", dict(qkv_bias=True, tie_embeddings=True, rope_theta=1e6)),
    "qwen3": ("qwen2", dict(qk_norm=True, tie_embeddings=True, rope_theta=1e6)),
    "llama3": ("llama3", dict(tie_embeddings=False, rope_theta=5e5, rope_scaling="llama3",
                              rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                              rope_high_freq_factor=4.0, rope_original_max_len=64)),
    "mistral": ("mistral", dict(tie_embeddings=False, sliding_window=64)),
}


def write_random_hf_model(out_dir: str | os.PathLike, family: str, texts: Sequence[str], *,
                          embed_dim: int = 64, num_layers: int = 2, num_heads: int = 4,
                          num_kv_heads: int = 2, mlp_dim: int = 128, max_seq_len: int = 1024,
                          tokenizer_vocab: int = 800, seed: int = 0) -> ModelConfig:
    """Writes a random `family` model with a tokenizer trained on `texts` to `out_dir`.

    Args:
        out_dir: the directory (created): config.json, model.safetensors,
            generation_config.json, tokenizer files with the family's chat template.
        family: a FAMILY_FEATURES key.
        texts: tokenizer training documents (str).
        embed_dim, num_layers, num_heads, num_kv_heads, mlp_dim, max_seq_len: the shape
            (head_dim = embed_dim // num_heads).
        tokenizer_vocab: learnt vocabulary before special tokens.
        seed: tokenizer order and weight draws.

    Returns:
        The ModelConfig written (vocab rounded up to a multiple of 64 over the tokenizer's).
    """
    from instructjax.data import tokenizer as tok_lib
    from instructjax.data import tokenizer_files
    from instructjax.model import hf
    from instructjax.model.transformer import init_params
    if family not in FAMILY_FEATURES:
        raise ValueError(f"family must be one of {sorted(FAMILY_FEATURES)}, got {family!r}")
    tok_family, features = FAMILY_FEATURES[family]
    out_dir = os.fspath(out_dir)
    tokenizer_files.build_hf_tokenizer_dir(out_dir, texts, tok_family,
                                           vocab_size=tokenizer_vocab, seed=seed)
    tokenizer = tok_lib.load_tokenizer(out_dir)
    vocab = -(-tokenizer.vocab_size // 64) * 64
    cfg = ModelConfig(vocab_size=vocab, embed_dim=embed_dim, num_layers=num_layers,
                      num_heads=num_heads, num_kv_heads=num_kv_heads,
                      head_dim=embed_dim // num_heads, mlp_dim=mlp_dim, max_seq_len=max_seq_len,
                      norm_eps=1e-6, **features)
    params = jax.device_get(init_params(cfg, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    # init sets biases to 0 and norm scales to 1: draw them too, so every feature matters
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: _redraw(path, x, rng), params)
    hf.save_hf(params, cfg, out_dir, tokenizer=tokenizer)
    return cfg


def _redraw(path, x, rng):
    name = jax.tree_util.keystr(path)
    if "bias" in name:
        return rng.normal(0.0, 0.1, x.shape).astype(x.dtype)
    if "norm" in name:
        return rng.uniform(0.8, 1.2, x.shape).astype(x.dtype)
    return np.asarray(x)
