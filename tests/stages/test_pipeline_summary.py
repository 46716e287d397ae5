"""The pipeline's readers of metrics.jsonl (summary.json, the PPO plot) handle non-finite
values: a diverged metric is reported as null in strict JSON and plotted as a gap."""

import json
import math
import os

from instructjax.stages import pipeline
from instructjax.train.metrics import MetricsWriter


def write_rows(workdir, rows):
    with MetricsWriter(str(workdir), tensorboard=False) as writer:
        for step, split, metrics in rows:
            writer.write(step, split, metrics)


def test_summary_and_plot_with_nonfinite_metrics(tmp_path):
    scores = {"true_score": 0.5, "true_score_sampled": 0.4, "heldout_true_score": 0.3,
              "heldout_true_score_sampled": 0.2}
    write_rows(tmp_path / "sft", [(0, "eval", scores),
                                  (10, "eval", {**scores, "true_score": math.inf})])
    write_rows(tmp_path / "reward", [(10, "eval", {"accuracy": 0.9})])
    write_rows(tmp_path / "ppo", [(1, "train", {"score": 0.1, "kl": 0.2}),
                                  (2, "train", {"score": math.nan, "kl": math.nan}),
                                  (2, "eval", scores)])
    summary = pipeline.summarize(str(tmp_path), {"sft": 1.0, "ppo": 2.0})
    json.dumps(summary, allow_nan=False)  # strict JSON
    assert summary["true_score"] == {"pretrain": 0.5, "sft": None, "ppo": 0.5}
    assert summary["ppo_final_kl"] is None and summary["ppo_final_score"] is None
    assert summary["reward_accuracy"] == 0.9
    plot = tmp_path / "curves.png"
    pipeline.plot_ppo(str(tmp_path), str(plot))
    assert os.path.getsize(plot) > 10_000
