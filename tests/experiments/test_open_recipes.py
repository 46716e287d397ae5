"""The open-model recipes (configs/open_qwen_*.py): each dry run passes without the weights
(the preset has the real model's shape), and the three stages run as configured on the shared
samples of pCLUE and Anthropic HH, in the data's own formats, from a random model of the same
family (Qwen2: qkv bias, tied embeddings, ChatML template) made locally."""
import gzip
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED = "/work/shared/data"
PCLUE = os.path.join(SHARED, "pclue", "pCLUE_train_9.json")
HH = os.path.join(SHARED, "hh-rlhf", "harmless-base_test.jsonl.gz")
HH_PROMPTS = os.path.join(SHARED, "hh-rlhf", "harmless-base_test_prompts.jsonl")
RECIPES = ("open_qwen_sft_pclue", "open_qwen_reward_hh", "open_qwen_ppo_hh")
# CPU-sized: float32, no remat, the XLA attention path, one device.
SMALL = ["--config.model.dtype=float32", "--config.model.remat_policy=none",
         "--config.model.attention_impl=xla", "--config.mesh.data=1",
         "--config.train.eval_every=1000", "--config.train.checkpoint_every=1000"]


def run(*args, timeout=900):
    out = subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=REPO,
                         capture_output=True, text=True, timeout=timeout,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, (args, out.stderr[-3000:])
    return out.stdout


@pytest.mark.parametrize("name", RECIPES)
def test_dry_run_passes_without_the_weights(name, tmp_path):
    stdout = run(f"--config=configs/{name}.py", f"--workdir={tmp_path}", "--config.dry_run=True")
    # Qwen2.5-0.5B: 494,032,768 params (the reward model adds its E + 1 head)
    assert "494,032,768" in stdout or "494,033,665" in stdout


def _texts(limit=300):
    texts = [json.loads(line)["input"] for line in open(PCLUE, encoding="utf-8")][:limit]
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        texts += [json.loads(line)["chosen"] for _, line in zip(range(limit), f)]
    return texts


@pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"the shared data samples ({SHARED}) "
                    "are not on this machine")
def test_recipes_run_on_the_shared_samples_from_a_random_qwen2(tmp_path):
    from instructjax.model.hf.random_model import write_random_hf_model
    model_dir = tmp_path / "qwen"
    write_random_hf_model(model_dir, "qwen2", _texts(), embed_dim=32, num_heads=2,
                          num_kv_heads=1, mlp_dim=64, max_seq_len=1024, tokenizer_vocab=800)
    run("--config=configs/open_qwen_sft_pclue.py", f"--workdir={tmp_path / 'sft'}", *SMALL,
        f"--config.init_from_hf={model_dir}", f"--config.data.path={PCLUE}",
        "--config.data.seq_len=256", "--config.train.steps=2", "--config.train.batch_size=4")
    run("--config=configs/open_qwen_reward_hh.py", f"--workdir={tmp_path / 'reward'}", *SMALL,
        f"--config.init_from={tmp_path / 'sft'}", f"--config.data.path={HH}",
        "--config.data.seq_len=384", "--config.train.steps=2", "--config.train.batch_size=4",
        "--config.reward.stats_samples=8", "--config.eval.batch_size=8",
        "--config.eval.max_prompt_len=256", "--config.eval.max_new_tokens=8")
    stdout = run("--config=configs/open_qwen_ppo_hh.py", f"--workdir={tmp_path / 'ppo'}",
                 *SMALL, f"--config.init_from={tmp_path / 'sft'}",
                 f"--config.ppo.reward_from={tmp_path / 'reward'}",
                 f"--config.data.path={HH_PROMPTS}", "--config.data.skip_malformed=True",
                 "--config.train.steps=1",
                 "--config.ppo.prompts_per_iteration=8", "--config.ppo.num_samples=1",
                 "--config.ppo.minibatch_size=4", "--config.ppo.epochs=1",
                 "--config.ppo.max_prompt_len=256", "--config.ppo.max_new_tokens=8",
                 f"--config.export_hf={tmp_path / 'policy_hf'}")
    assert "[ppo] step 1/1" in stdout
    for stage in ("sft", "reward", "ppo"):
        info = json.load(open(tmp_path / stage / "run_info.json"))
        assert info["tokenizer"] == "tokenizer" and info["model"]["qkv_bias"], stage
    assert (tmp_path / "reward" / "reward_stats.json").is_file()
    assert json.load(open(tmp_path / "policy_hf" / "config.json"))["architectures"] == \
        ["Qwen2ForCausalLM"]
