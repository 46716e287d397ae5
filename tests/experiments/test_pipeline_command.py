"""The whole pipeline command on minimal step counts: every stage runs in WORKDIR/<stage>/,
summary.json and the PPO plot are written, and a second invocation skips every stage."""

import json
import os
import subprocess
import sys

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
