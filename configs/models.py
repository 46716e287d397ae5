"""Model size presets shared by the experiment configs.

`get(name)` returns a ConfigDict whose keys are exactly the fields of
`instructjax.model.config.ModelConfig`; experiment configs override single keys.
Parameter counts (closed form, `instructjax.model.config.count_params`) are in each comment.
"""

import ml_collections

_COMMON = dict(
    rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False, qkv_bias=False,
    # Open-model family features (model/config.py): LLaMA 3.1's RoPE scaling, Qwen3's q/k
    # norms, Mistral's sliding window. Off in our own presets.
    rope_scaling="none", rope_scaling_factor=1.0, rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0, rope_original_max_len=0, qk_norm=False, sliding_window=0,
    dtype="bfloat16", param_dtype="float32", scan_layers=True, remat_policy="full",
    attention_impl="xla",
)

PRESETS = {
    # ~0.92M params with vocab 1024: CPU-minutes experiments and tests. Layers unrolled: on
    # XLA:CPU the scanned stack's train step was ~14% slower (16 x 128 tokens: 407-432 ms
    # scanned vs 346-374 ms unrolled, benchmarks/train_step.py); compile time is the same.
    "tiny": dict(vocab_size=1024, embed_dim=128, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=32, mlp_dim=384, max_seq_len=256, tie_embeddings=True,
                 dtype="float32", remat_policy="none", scan_layers=False),
    # GPT-2-small-sized LLaMA: ~134M params with vocab 32000.
    "125m": dict(vocab_size=32000, embed_dim=768, num_layers=12, num_heads=12, num_kv_heads=12,
                 head_dim=64, mlp_dim=2048, max_seq_len=2048, tie_embeddings=True),
    # TinyLlama-1.1B shape: ~1.10B params.
    "1b": dict(vocab_size=32000, embed_dim=2048, num_layers=22, num_heads=32, num_kv_heads=4,
               head_dim=64, mlp_dim=5632, max_seq_len=2048),
    # LLaMA-2-7B shape: ~6.74B params.
    "7b": dict(vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=32,
               head_dim=128, mlp_dim=11008, max_seq_len=4096),
    # The shape of Qwen2.5-0.5B(-Instruct) (config.json of Qwen/Qwen2.5-0.5B-Instruct): qkv
    # bias, tied embeddings, GQA 7:1; 494,032,768 params. With config.init_from_hf the
    # weights' own config.json decides the shape; the preset sizes the dry run.
    "qwen2.5-0.5b": dict(vocab_size=151936, embed_dim=896, num_layers=24, num_heads=14,
                         num_kv_heads=2, head_dim=64, mlp_dim=4864, max_seq_len=32768,
                         rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True,
                         qkv_bias=True),
    # LLaMA-13B width with 36 layers and GQA 5:1: ~10.2B params.
    "10b": dict(vocab_size=32000, embed_dim=5120, num_layers=36, num_heads=40, num_kv_heads=8,
                head_dim=128, mlp_dim=13824, max_seq_len=4096),
}


def get(name: str) -> ml_collections.ConfigDict:
    """The preset `name` as a ConfigDict (a fresh copy each call)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
    return ml_collections.ConfigDict({**_COMMON, **PRESETS[name]})
