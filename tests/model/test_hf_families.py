"""Importing each supported Hugging Face family gives transformers' logits, on whole
sequences and step by step through our KV cache, and each family's feature is needed for it.

Families: LLaMA 3 (llama3 RoPE scaling), LLaMA 2 (plain RoPE, older config.json format),
Qwen2 (qkv bias, tied embeddings), Qwen3 (qk norm), Mistral (sliding window); plus a
checkpoint sharded by save_pretrained and one saved in bfloat16.
"""
import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="transformers' models are the reference")
pytest.importorskip("transformers", reason="transformers' models are the reference")

import hf_random_models as hfm  # noqa: E402
from instructjax.model import cache as cache_lib  # noqa: E402
from instructjax.model.hf import load_hf  # noqa: E402
from instructjax.model.transformer import Transformer  # noqa: E402

# Both sides compute in float32 from the same weights; they differ in summation order
# (measured max |delta logit| ~1e-6 on logits of magnitude ~5). 1e-4 leaves ~100x headroom,
# while a family feature left out moves logits by 1e-2 or more (test_feature_is_needed).
LOGIT_TOL = 1e-4
# Greedy tokens must agree wherever the best logit leads the runner-up by more than this
# (closer calls may flip under a 1e-6 difference in summation order).
MARGIN = 1e-3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (checkpoint dir, the transformers model it holds)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for seed, family in enumerate(hfm.FAMILIES):
        model = hfm.make_model(family, seed=seed)
        out[family] = (hfm.save(model, root / family), model)
    # LLaMA 2 checkpoints predate rope_parameters: top-level rope_theta, rope_scaling null
    # and torch_dtype instead of dtype.
    hfm.rewrite_config(out["llama2"][0], update={"rope_theta": 20000.0, "rope_scaling": None,
                                                 "torch_dtype": "float32"},
                       remove=("rope_parameters", "dtype"))
    return out


@pytest.fixture(scope="module")
def tokens():
    return hfm.tokens(0, (1, hfm.SEQ_LEN))


@pytest.mark.parametrize("family", list(hfm.FAMILIES))
def test_family_logits_match_transformers(checkpoints, tokens, family):
    path, model = checkpoints[family]
    params, cfg, info = load_hf(path)
    assert info["architecture"] == model.config.architectures[0]
    diff = hfm.max_abs_diff(hfm.our_logits(cfg, params, tokens), hfm.hf_logits(model, tokens))
    print(f"\n{family}: max |delta logit| = {diff:.2e}")
    assert diff <= LOGIT_TOL


def test_config_mapping_of_each_family(checkpoints):
    cfgs = {family: load_hf(path)[1] for family, (path, _) in checkpoints.items()}
    assert (cfgs["llama3"].rope_scaling, cfgs["llama3"].rope_original_max_len) == ("llama3", 64)
    assert (cfgs["llama2"].rope_scaling, cfgs["llama2"].rope_theta) == ("none", 20000.0)
    assert cfgs["qwen2"].qkv_bias and cfgs["qwen2"].tie_embeddings
    assert cfgs["qwen3"].qk_norm and not cfgs["qwen3"].qkv_bias
    assert cfgs["qwen3"].head_dim == 32  # not hidden_size / heads = 16
    assert cfgs["mistral"].sliding_window == 32
    assert all(c.max_seq_len == 512 for c in cfgs.values())


def _drop(params, *paths):
    """A copy of scanned params without the params at `paths` (tuples of keys)."""
    params = jax.tree.map(lambda x: x, params)
    for path in paths:
        node = params
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return params


_NO_LLAMA3 = dict(rope_scaling="none", rope_scaling_factor=1.0, rope_low_freq_factor=1.0,
                  rope_high_freq_factor=4.0, rope_original_max_len=0)


def _feature_off(family, cfg, params):
    """(cfg, params) with the family's own feature switched off."""
    attn = ("layers", "attn")
    if family == "llama3":
        return cfg.replace(**_NO_LLAMA3), params
    if family == "llama2":  # untied: reading the embedding as the LM head must fail
        return cfg.replace(tie_embeddings=True), _drop(params, ("lm_head",))
    if family == "qwen2":
        return cfg.replace(qkv_bias=False), _drop(
            params, *[attn + (name, "bias") for name in ("query", "key", "value")])
    if family == "qwen3":
        return cfg.replace(qk_norm=False), _drop(params, attn + ("query_norm",),
                                                 attn + ("key_norm",))
    return cfg.replace(sliding_window=0), params


@pytest.mark.parametrize("family", list(hfm.FAMILIES))
def test_feature_is_needed(checkpoints, tokens, family):
    path, model = checkpoints[family]
    params, cfg, _ = load_hf(path)
    cfg_off, params_off = _feature_off(family, cfg, params)
    diff = hfm.max_abs_diff(hfm.our_logits(cfg_off, params_off, tokens),
                            hfm.hf_logits(model, tokens))
    print(f"\n{family} with its feature off: max |delta logit| = {diff:.2e}")
    assert diff > LOGIT_TOL


def test_sharded_and_bf16_checkpoints(checkpoints, tokens, tmp_path):
    _, model = checkpoints["qwen2"]
    sharded = hfm.save(model, tmp_path / "sharded", max_shard_size="40KB")
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) > 2
    params, cfg, _ = load_hf(sharded)
    reference = hfm.hf_logits(model, tokens)
    assert hfm.max_abs_diff(hfm.our_logits(cfg, params, tokens), reference) <= LOGIT_TOL

    # A copy: .to() converts in place, and the fixture's model serves the other tests.
    bf16 = hfm.save(copy.deepcopy(model).to(torch.bfloat16), tmp_path / "bf16")
    import transformers
    # The same bf16 weights upcast exactly to float32 on both sides.
    upcast = transformers.AutoModelForCausalLM.from_pretrained(
        bf16, dtype=torch.float32, attn_implementation="eager").eval()
    params, cfg, info = load_hf(bf16)
    assert info["torch_dtype"] == "bfloat16"
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    diff = hfm.max_abs_diff(hfm.our_logits(cfg, params, tokens), hfm.hf_logits(upcast, tokens))
    assert diff <= LOGIT_TOL
    params16, cfg16, _ = load_hf(bf16, dtype="bfloat16", scan_layers=False, max_seq_len=64)
    assert (cfg16.param_dtype, cfg16.scan_layers, cfg16.max_seq_len) == ("bfloat16", False, 64)
    # bf16 on disk -> bf16 params is a copy, not a rounding.
    np.testing.assert_array_equal(np.asarray(params16["embed"]["embedding"], np.float32),
                                  np.asarray(params["embed"]["embedding"]))


def _our_decode_logits(cfg, params, prompt, new_tokens):
    """Our logits [steps, V] from a cached prefill of prompt [1, P], then one step per token
    of new_tokens [steps - 1] (teacher-forced, so both sides see the same prefix)."""
    steps = len(new_tokens) + 1
    cache = cache_lib.init_cache(cfg, 1, prompt.shape[1] + steps)
    decode = jax.jit(lambda p, t, c, i: Transformer(cfg).apply({"params": p}, t, None, c, i,
                                                               method="decode"))
    logits, cache = decode(params, prompt, cache, jnp.int32(0))
    out = [logits[0, -1]]
    for s, token in enumerate(new_tokens):
        logits, cache = decode(params, jnp.asarray([[token]], jnp.int32), cache,
                               jnp.int32(prompt.shape[1] + s))
        out.append(logits[0, -1])
    return np.stack([np.asarray(x) for x in out])


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral"])
def test_greedy_decoding_matches_generate(checkpoints, family):
    path, model = checkpoints[family]
    params, cfg, _ = load_hf(path)
    # Past the llama3 original length (64) and the Mistral window (32).
    prompt = hfm.tokens(1, (1, 80))
    # No end-of-sequence id: all 32 steps run, and no logits processor alters the picks.
    generation_config = copy.deepcopy(model.generation_config)
    generation_config.update(eos_token_id=None, max_new_tokens=32, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    out = model.generate(torch.as_tensor(prompt, dtype=torch.long),
                         generation_config=generation_config)
    hf_tokens = out.sequences[0, prompt.shape[1]:].numpy()
    hf_step_logits = np.stack([x[0].float().numpy() for x in out.logits])
    ours = _our_decode_logits(cfg, params, prompt, hf_tokens[:-1])
    diff = hfm.max_abs_diff(ours, hf_step_logits)
    print(f"\n{family} decoding, 32 steps: max |delta logit| = {diff:.2e}")
    assert diff <= LOGIT_TOL
    top2 = np.sort(hf_step_logits, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > MARGIN
    np.testing.assert_array_equal(ours.argmax(-1)[clear], hf_tokens[clear])
