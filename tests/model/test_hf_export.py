"""Export to Hugging Face: transformers loads what save_hf writes and computes our logits,
re-import is bit for bit, and reward models round-trip through
AutoModelForSequenceClassification with the score at the last non-pad token."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="transformers' models are the reference")
transformers = pytest.importorskip("transformers", reason="transformers' models are the "
                                                          "reference")

import hf_random_models as hfm  # noqa: E402
from instructjax.model.config import ModelConfig  # noqa: E402
from instructjax.model.heads import RewardModel, gather_last  # noqa: E402
from instructjax.model.hf import (load_hf, load_hf_reward, save_hf,  # noqa: E402
                                  save_hf_reward)
from instructjax.model.transformer import (init_params, stack_layer_params,  # noqa: E402
                                           unstack_layer_params)

# Same float32 math in another summation order (see test_hf_families.py): measured ~1e-6.
LOGIT_TOL = 1e-4
BASE = ModelConfig(vocab_size=300, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2,
                   head_dim=16, mlp_dim=128, max_seq_len=512, tie_embeddings=False)
LLAMA3 = dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
              rope_high_freq_factor=4.0, rope_original_max_len=64)
CONFIGS = {
    "llama3": (BASE.replace(**LLAMA3), "LlamaForCausalLM"),
    "qwen2": (BASE.replace(qkv_bias=True, tie_embeddings=True, rope_theta=1e6), "Qwen2ForCausalLM"),
    "qwen3": (BASE.replace(qk_norm=True, head_dim=32), "Qwen3ForCausalLM"),
    "mistral": (BASE.replace(sliding_window=32), "MistralForCausalLM"),
}


def random_params(cfg, seed):
    """init_params' tree with every leaf re-drawn: kernels and biases N(0, 0.1^2), norm
    scales N(1, 0.2^2) (init's zero biases and unit scales would hide misplaced ones)."""
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        is_scale = str(path[-1].key) == "scale"
        return jnp.asarray(1.0 + 0.2 * noise if is_scale else 0.1 * noise, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, init_params(cfg, jax.random.key(seed)))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def load_transformers(path, auto=transformers.AutoModelForCausalLM):
    return auto.from_pretrained(path, attn_implementation="eager").eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_loads_in_transformers_with_our_logits(name, tmp_path):
    cfg, architecture = CONFIGS[name]
    params = random_params(cfg, seed=len(name))
    save_hf(params, cfg, tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["architectures"] == [architecture]
    tokens = hfm.tokens(0, (1, hfm.SEQ_LEN))
    diff = hfm.max_abs_diff(hfm.our_logits(cfg, params, tokens),
                            hfm.hf_logits(load_transformers(tmp_path), tokens))
    print(f"\nexport {name}: max |delta logit| = {diff:.2e}")
    assert diff <= LOGIT_TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_then_import_is_exact(name, tmp_path):
    cfg, _ = CONFIGS[name]
    params = random_params(cfg, seed=1)
    save_hf(params, cfg, tmp_path)
    params2, cfg2, info = load_hf(tmp_path)
    assert cfg2 == cfg
    assert_trees_equal(params2, params)
    assert info["torch_dtype"] == "float32"


def test_unrolled_sharded_and_bf16_exports(tmp_path):
    cfg, _ = CONFIGS["qwen3"]
    params = random_params(cfg, seed=2)
    unrolled = unstack_layer_params(params)
    save_hf(unrolled, cfg.replace(scan_layers=False), tmp_path / "shards", max_shard_bytes=50_000)
    files = os.listdir(tmp_path / "shards")
    assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    params2, cfg2, _ = load_hf(tmp_path / "shards", scan_layers=False)
    assert cfg2 == cfg.replace(scan_layers=False)
    assert_trees_equal(stack_layer_params(params2), params)

    save_hf(params, cfg, tmp_path / "bf16", dtype="bfloat16")
    params16, _, info = load_hf(tmp_path / "bf16", dtype="bfloat16")
    assert info["torch_dtype"] == "bfloat16"
    assert_trees_equal(params16, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    # A second save into the same directory replaces the shards: no stale index is left.
    save_hf(params, cfg, tmp_path / "shards")
    assert "model.safetensors.index.json" not in os.listdir(tmp_path / "shards")
    assert_trees_equal(load_hf(tmp_path / "shards")[0], params)


def test_info_ids_architecture_and_generation_config(tmp_path):
    cfg = BASE  # no window, so LLaMA unless the imported architecture says Mistral
    info = {"architecture": "MistralForCausalLM", "bos_token_id": 5, "eos_token_id": [6, 7],
            "pad_token_id": 0, "max_position_embeddings": 4096}
    save_hf(random_params(cfg, 3), cfg, tmp_path, info=info)
    with open(tmp_path / "config.json") as f:
        hf = json.load(f)
    with open(tmp_path / "generation_config.json") as f:
        generation = json.load(f)
    assert hf["architectures"] == ["MistralForCausalLM"] and hf["sliding_window"] is None
    assert (hf["eos_token_id"], hf["max_position_embeddings"]) == ([6, 7], 4096)
    assert generation == {"bos_token_id": 5, "eos_token_id": [6, 7], "pad_token_id": 0}
    _, cfg2, info2 = load_hf(tmp_path, max_seq_len=512)
    assert cfg2 == cfg
    assert {k: info2[k] for k in info} == info
    assert load_hf(tmp_path)[1].max_seq_len == 4096


class _FakeTokenizer:
    bos_id, eos_id, pad_id, eos_ids = 2, 3, 0, (3,)

    def save_pretrained(self, path):
        with open(os.path.join(path, "tokenizer.json"), "w") as f:
            f.write("{}")


def test_tokenizer_files_and_ids(tmp_path):
    save_hf(random_params(BASE, 4), BASE, tmp_path / "ok", tokenizer=_FakeTokenizer())
    assert os.path.isfile(tmp_path / "ok" / "tokenizer.json")
    _, _, info = load_hf(tmp_path / "ok")
    assert (info["bos_token_id"], info["eos_token_id"], info["pad_token_id"]) == (2, 3, 0)
    with pytest.raises(TypeError, match="save_pretrained"):
        save_hf(random_params(BASE, 4), BASE, tmp_path / "bad", tokenizer=object())
    assert not os.path.exists(tmp_path / "bad")


def test_export_refuses_a_mismatched_config(tmp_path):
    params = random_params(BASE, 5)
    with pytest.raises(ValueError, match="lm_head"):
        save_hf(params, BASE.replace(tie_embeddings=True), tmp_path)
    with pytest.raises(ValueError, match="qkv_bias"):
        cfg = BASE.replace(qkv_bias=True, sliding_window=8)
        save_hf(random_params(cfg, 5), cfg, tmp_path)


# ---------------------------------------------------------------- reward models

def _padded_reward_batch(pad_id=0):
    """Tokens [2, 40] right-padded by 0 and 9 pads (no pad id among the real tokens), and
    the mask."""
    token_ids = hfm.tokens(6, (2, 40), low=1)
    mask = np.ones((2, 40), np.int32)
    mask[1, 31:] = 0
    return np.where(mask == 1, token_ids, pad_id).astype(np.int32), mask


def our_rewards(cfg, params, token_ids, mask):
    scores = RewardModel(cfg).apply({"params": params}, jnp.asarray(token_ids))
    return np.asarray(gather_last(scores, jnp.asarray(mask)))


def hf_rewards(model, token_ids, mask):
    return hfm.hf_logits(model, token_ids, attention_mask=torch.as_tensor(mask))[:, 0]


def test_reward_export_scores_in_transformers_and_reimports_exactly(tmp_path):
    cfg = CONFIGS["qwen2"][0]
    params = {"trunk": random_params(cfg, 7),
              "head": {"kernel": jnp.asarray(np.random.RandomState(7).randn(64), jnp.float32),
                       "bias": jnp.asarray(0.375, jnp.float32)}}
    save_hf_reward(params, cfg, tmp_path, info={"pad_token_id": 0})
    token_ids, mask = _padded_reward_batch()
    model = load_transformers(tmp_path, transformers.AutoModelForSequenceClassification)
    assert type(model).__name__ == "Qwen2ForSequenceClassification"
    ours = our_rewards(cfg, params, token_ids, mask)
    # transformers' score lacks our bias (its score layer has none).
    diff = hfm.max_abs_diff(hf_rewards(model, token_ids, mask) + 0.375, ours)
    print(f"\nreward export: max |delta score| = {diff:.2e}")
    assert diff <= LOGIT_TOL
    params2, cfg2, info = load_hf_reward(tmp_path)
    assert cfg2 == cfg and info["score_bias"] == 0.375
    assert_trees_equal(params2, params)


def test_reward_import_of_a_transformers_classifier(tmp_path):
    model = hfm.make_model("llama3", seed=8, head="ForSequenceClassification", num_labels=1,
                           pad_token_id=0)
    hfm.save(model, tmp_path)
    params, cfg, info = load_hf_reward(tmp_path)
    assert cfg.tie_embeddings and info["score_bias"] == 0.0 and info["pad_token_id"] == 0
    token_ids, mask = _padded_reward_batch()
    diff = hfm.max_abs_diff(our_rewards(cfg, params, token_ids, mask),
                            hf_rewards(model, token_ids, mask))
    print(f"\nreward import: max |delta score| = {diff:.2e}")
    assert diff <= LOGIT_TOL


def test_reward_export_needs_a_pad_id(tmp_path):
    params = {"trunk": random_params(BASE, 9),
              "head": {"kernel": jnp.zeros((64,)), "bias": jnp.zeros(())}}
    with pytest.raises(ValueError, match="pad token id"):
        save_hf_reward(params, BASE, tmp_path)


def test_every_eos_id_and_the_chosen_pad_survive_an_export(tmp_path):
    # LLaMA 3 ends turns with <|eot_id|> and texts with <|end_of_text|>; a Qwen-style pad
    # that is also an EOS is replaced by another token (tokenizer_meta.choose_pad_id)
    from instructjax.data import tokenizer as tok_lib
    from instructjax.data import tokenizer_files
    texts = ["Hello there, how are you? 你好 🙂", "1 plus 2 is 3."] * 30
    for family in ("llama3", "qwen2"):
        source = tokenizer_files.build_hf_tokenizer_dir(tmp_path / family, texts, family,
                                                        vocab_size=400)
        tokenizer = tok_lib.load_tokenizer(source)
        cfg = BASE.replace(vocab_size=max(BASE.vocab_size, tokenizer.vocab_size))
        out = save_hf(random_params(cfg, 5), cfg, tmp_path / f"{family}_out",
                      tokenizer=tokenizer)
        again = tok_lib.load_tokenizer(out)
        assert again.eos_ids == tokenizer.eos_ids and again.pad_id == tokenizer.pad_id, family
        _, _, info = load_hf(out)
        eos = info["eos_token_id"]
        assert (list(eos) if isinstance(eos, list) else [eos]) == list(tokenizer.eos_ids)
        assert info["pad_token_id"] == tokenizer.pad_id
        if len(tokenizer.eos_ids) > 1:
            generation = json.load(open(os.path.join(out, "generation_config.json")))
            assert generation["eos_token_id"] == list(tokenizer.eos_ids), family
