"""Bad Hugging Face checkpoints fail with errors that name what is wrong, and config.json
variants (old and new RoPE formats, special ids) map as transformers reads them.
No torch needed: the checkpoints are written by save_hf and then damaged."""
import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from instructjax.model.config import ModelConfig
from instructjax.model.hf import (CheckpointMismatchError, UnsupportedCheckpointError,
                                  configs, load_hf, save_hf)
from instructjax.model.transformer import init_params

CFG = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=48, max_seq_len=128, tie_embeddings=False)
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def edit_config(path, **changes):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        hf = json.load(f)
    hf.update(changes)
    with open(file, "w") as f:
        json.dump(hf, f)


def edit_tensors(path, edit):
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_unsupported_architecture_is_named(params, tmp_path):
    save_hf(params, CFG, tmp_path)
    edit_config(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedCheckpointError) as err:
        load_hf(tmp_path)
    assert "GPT2LMHeadModel" in str(err.value)
    assert all(name in str(err.value) for name in configs.CAUSAL_LM)


def test_missing_shard_file_is_named(params, tmp_path):
    save_hf(params, CFG, tmp_path, max_shard_bytes=10_000)
    shards = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-"))
    assert len(shards) > 2
    os.remove(tmp_path / shards[1])
    with pytest.raises(FileNotFoundError, match=shards[1]):
        load_hf(tmp_path)


def test_missing_unexpected_and_misshaped_tensors_are_named(params, tmp_path):
    save_hf(params, CFG, tmp_path)
    edit_tensors(tmp_path, lambda t: t.pop(Q_PROJ))
    with pytest.raises(CheckpointMismatchError, match=f"'{Q_PROJ}' is missing"):
        load_hf(tmp_path)

    save_hf(params, CFG, tmp_path)
    extra = "model.layers.0.self_attn.o_proj.bias"
    edit_tensors(tmp_path, lambda t: t.update({extra: np.zeros(32, np.float32)}))
    with pytest.raises(CheckpointMismatchError, match=f"unexpected tensor '{extra}'"):
        load_hf(tmp_path)

    save_hf(params, CFG, tmp_path)
    edit_tensors(tmp_path, lambda t: t.update({Q_PROJ: np.zeros((32, 24), np.float32)}))
    with pytest.raises(CheckpointMismatchError) as err:
        load_hf(tmp_path)
    assert f"'{Q_PROJ}' has shape [32, 24], expected [32, 32]" in str(err.value)


def test_no_weights_and_no_config_are_named(params, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path)
    save_hf(params, CFG, tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf(tmp_path)


@pytest.mark.parametrize("field, value", [
    ("hidden_act", "gelu"),
    ("attention_bias", True),
    ("mlp_bias", True),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
    ("partial_rotary_factor", 0.5),
])
def test_unsupported_config_values_name_the_field(params, tmp_path, field, value):
    save_hf(params, CFG, tmp_path)
    edit_config(tmp_path, **{field: value})
    with pytest.raises(UnsupportedCheckpointError, match=field):
        load_hf(tmp_path)


def test_qwen_sliding_window_is_refused(tmp_path):
    cfg = CFG.replace(qkv_bias=True)
    save_hf(init_params(cfg, jax.random.key(1)), cfg, tmp_path)
    edit_config(tmp_path, use_sliding_window=True, sliding_window=16)
    with pytest.raises(UnsupportedCheckpointError, match="use_sliding_window"):
        load_hf(tmp_path)


# ---------------------------------------------------------------- config.json variants

def llama_config(**changes):
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
          "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}
    hf.update(changes)
    return hf


def test_old_and_new_llama3_rope_formats_agree():
    new = llama_config(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 512})
    old = llama_config(rope_theta=5e5, rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 512})
    a = configs.model_config_from_hf(new, "Llama")
    assert a == configs.model_config_from_hf(old, "Llama")
    assert (a.rope_scaling, a.rope_theta, a.rope_original_max_len) == ("llama3", 5e5, 512)
    # Defaults transformers applies: K = H, D = E / H, theta 1e4, untied.
    plain = configs.model_config_from_hf(llama_config(), "Llama")
    assert (plain.num_kv_heads, plain.head_dim, plain.rope_theta, plain.rope_scaling,
            plain.tie_embeddings, plain.norm_eps) == (4, 8, 1e4, "none", False, 1e-5)


def test_info_ids_with_an_eos_list_and_generation_config(tmp_path):
    hf = llama_config(bos_token_id=1, eos_token_id=[2, 9], torch_dtype="bfloat16")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf, f)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump({"pad_token_id": 7, "eos_token_id": 5}, f)
    hf = configs.read_hf_config(tmp_path)
    info = configs.info_from_hf(hf, "LlamaForCausalLM")
    # config.json wins; generation_config.json only fills what config.json lacks.
    assert (info["bos_token_id"], info["eos_token_id"], info["pad_token_id"]) == (1, [2, 9], 7)
    assert info["torch_dtype"] == "bfloat16"


def test_mistral_null_window_and_family_choice():
    mistral = llama_config(architectures=["MistralForCausalLM"], sliding_window=None)
    assert configs.model_config_from_hf(mistral, "Mistral").sliding_window == 0
    assert configs.export_family(CFG) == "Llama"
    assert configs.export_family(CFG.replace(sliding_window=8)) == "Mistral"
    assert configs.export_family(CFG.replace(qkv_bias=True)) == "Qwen2"
    assert configs.export_family(CFG.replace(qk_norm=True)) == "Qwen3"
    # An imported family that cannot express the config gives way to the inferred one.
    assert configs.export_family(CFG.replace(qk_norm=True),
                                 {"architecture": "LlamaForCausalLM"}) == "Qwen3"
    with pytest.raises(UnsupportedCheckpointError, match="qk_norm=True"):
        configs.export_family(CFG.replace(qk_norm=True, qkv_bias=True))
