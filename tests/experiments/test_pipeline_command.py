"""The whole pipeline command on minimal step counts: every stage runs in WORKDIR/<stage>/,
summary.json and the PPO plot are written, and a second invocation skips every stage. Then
the pipeline's Hugging Face exports load in transformers with our logits, and the chat
command answers a scripted two-turn conversation from the PPO workdir."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHORT = ["--config.stages.pretrain.train.steps=20", "--config.stages.sft.train.steps=10",
         "--config.stages.reward.train.steps=10", "--config.stages.reward.reward.stats_samples=32",
         "--config.stages.ppo.train.steps=2", "--config.stages.sft.eval.num_prompts=16",
         "--config.stages.ppo.eval.num_prompts=16"]


def run_pipeline(workdir):
    return subprocess.run([sys.executable, "-m", "experiments.run",
                           "--config=configs/pipeline_tiny.py", f"--workdir={workdir}", *SHORT],
                          cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_pipeline_runs_all_stages_then_skips_them(tmp_path):
    out = run_pipeline(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in ("tokenizer", "pretrain", "sft", "reward", "ppo"):
        assert os.path.isdir(tmp_path / stage), stage
    summary = json.loads((tmp_path / "summary.json").read_text())
    for stage in ("pretrain", "sft", "ppo"):
        for key in ("true_score", "true_score_sampled", "heldout_true_score",
                    "heldout_true_score_sampled"):
            assert 0.0 <= summary[key][stage] <= 1.0, (key, stage)
        assert summary["wall_time_s"][stage] > 0
    assert 0.0 <= summary["reward_accuracy"] <= 1.0
    assert summary["ppo_final_kl"] is not None
    assert (tmp_path / "ppo_curves.png").stat().st_size > 10_000
    assert "| stage" in out.stdout

    again = run_pipeline(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("pretrain", "sft", "reward", "ppo"):
        assert f"[{stage}] already finished" in again.stdout, stage
    assert "[export]" not in again.stdout  # the exports are current: not rewritten

    _check_exports_load_in_transformers(tmp_path)
    _check_chat_answers_two_turns(tmp_path / "ppo")


# Both sides compute in float32 from the same weights (the tiny preset's compute dtype).
LOGIT_TOL = 1e-4


def _check_exports_load_in_transformers(workdir):
    torch = pytest.importorskip("torch", reason="transformers is the reference reader")
    transformers = pytest.importorskip("transformers", reason="the reference reader")
    import jax.numpy as jnp
    from instructjax.data import tokenizer as tok_lib
    from instructjax.model.config import ModelConfig
    from instructjax.model.transformer import Transformer
    from instructjax.parallel import mesh as mesh_lib
    from instructjax.stages import workdirs

    policy_dir = str(workdir / "export" / "ppo_policy")
    info = workdirs.read_run_info(str(workdir / "ppo"))
    cfg = ModelConfig.from_dict(info["model"])
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    params = workdirs.load_transformer_params(str(workdir / "ppo"), cfg, mesh)
    tokenizer = tok_lib.load_tokenizer(policy_dir)
    ids = [tokenizer.bos_id] + tokenizer.encode("用户：12 加 7 等于多少？\n小元：")
    ours = np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray([ids])))
    model = transformers.AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits.float().numpy()
    assert np.max(np.abs(ours - theirs)) <= LOGIT_TOL
    # transformers' tokenizer reads the exported files as ours does
    hf_tok = transformers.AutoTokenizer.from_pretrained(policy_dir)
    assert hf_tok.encode("用户：12 加 7 等于多少？\n小元：", add_special_tokens=False) == ids[1:]

    reward_dir = str(workdir / "export" / "reward_model")
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tokenizer.pad_id


def _check_chat_answers_two_turns(ppo_dir):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.chat", f"--model={ppo_dir}", "--greedy",
         "--max_new_tokens=12", "--prompt=3 加 4 等于多少？", "--prompt=再加 5 呢？",
         "--show_speed"], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    turns = [i for i, line in enumerate(lines) if line.startswith(">>> ")]
    assert [lines[i] for i in turns] == [">>> 3 加 4 等于多少？", ">>> 再加 5 呢？"], out.stdout
    speed = [line for line in lines if "tokens/s" in line]
    assert len(speed) == 2, out.stdout
    # The second prompt holds the first exchange: history is kept across turns.
    prompt_tokens = [int(line.split("prompt ")[1].split(" tokens")[0]) for line in speed]
    assert prompt_tokens[1] > prompt_tokens[0] + 4, speed
