"""Tiny random Hugging Face models of each supported family, for the import/export tests.

Every tensor is re-drawn (HF initialises biases to 0 and norm scales to 1, which would hide
a bias or norm read from the wrong place): weights N(0, 0.1^2), biases N(0, 0.1^2), norm
scales N(1, 0.2^2). Shapes: vocab 300, E 64, 2 layers, H 4, K 2, D 16, F 128, 512 positions.
Needs torch and transformers (the callers skip without them).
"""
import functools
import json
import os

import jax
import numpy as np

from instructjax.model.transformer import Transformer

SHAPES = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=512, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # Well below the 320-token test sequence: all three llama3 bands matter.
               "original_max_position_embeddings": 64}
# One entry per checkpoint the tests compare: (transformers class name, config kwargs).
FAMILIES = {
    "llama3": ("LlamaForCausalLM", dict(rope_parameters=LLAMA3_ROPE,
                                        tie_word_embeddings=False)),
    "llama2": ("LlamaForCausalLM", dict(rope_parameters={"rope_type": "default",
                                                         "rope_theta": 20000.0},
                                        tie_word_embeddings=False)),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True, use_sliding_window=False)),
    # head_dim 32 != hidden_size / heads (16), as Qwen3 allows.
    "qwen3": ("Qwen3ForCausalLM", dict(tie_word_embeddings=False, use_sliding_window=False,
                                       head_dim=32)),
    # A window well below the test length, so it decides what most queries see.
    "mistral": ("MistralForCausalLM", dict(sliding_window=32, tie_word_embeddings=False)),
}
SEQ_LEN = 320


def randomize(model, seed):
    """Re-draws every parameter of a torch model in place (see the module doc)."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model


def make_model(family, seed=0, head="ForCausalLM", **overrides):
    """A random float32 eager-attention transformers model of `family` (a FAMILIES key)."""
    import transformers
    class_name, kwargs = FAMILIES[family]
    class_name = class_name.replace("ForCausalLM", head)
    model_cls = getattr(transformers, class_name)
    config_cls = getattr(transformers, class_name.replace(head, "Config"))
    config = config_cls(**{**SHAPES, **kwargs, **overrides})
    model = model_cls._from_config(config, attn_implementation="eager")
    return randomize(model, seed).eval()


def save(model, path, **kwargs):
    """save_pretrained with safetensors; returns path."""
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return str(path)


def rewrite_config(path, update=(), remove=()):
    """Edits config.json of a checkpoint directory in place."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    for key in remove:
        config.pop(key, None)
    config.update(dict(update))
    with open(file, "w") as f:
        json.dump(config, f)


def tokens(seed, shape, vocab_size=SHAPES["vocab_size"], low=0):
    """int32 random token ids."""
    return np.random.RandomState(seed).randint(low, vocab_size, shape).astype(np.int32)


def hf_logits(model, token_ids, **kwargs):
    """float32 numpy logits of a transformers model on token_ids [B, T]."""
    import torch
    with torch.no_grad():
        return model(torch.as_tensor(token_ids, dtype=torch.long), **kwargs).logits.float().numpy()


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    return jax.jit(lambda params, t: Transformer(cfg).apply({"params": params}, t))


def our_logits(cfg, params, token_ids):
    """float32 numpy logits of Transformer(cfg) (jitted once per config)."""
    return np.asarray(_forward(cfg)(params, token_ids))


def max_abs_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
