"""Stage `pipeline`: tokenizer -> pretrain -> SFT -> reward -> PPO, each in WORKDIR/<stage>/.

Each stage's config is `config.stages.<stage>`; the top-level seed, mesh and distributed
settings apply to all of them, and `init_from` / `ppo.reward_from` are wired to the earlier
stages' directories. Finished stages are skipped, unfinished ones resume. At the end,
WORKDIR/summary.json holds the true score after pretrain, SFT and PPO (on held-out prompts of
the training problems and on held-out problems), the reward model's accuracy, the final KL and
each stage's wall time; a table is printed and the PPO curves are plotted to
WORKDIR/ppo_curves.png. The PPO policy and the reward model are exported as Hugging Face
directories to WORKDIR/export/ppo_policy and WORKDIR/export/reward_model.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

from instructjax.stages import common, workdirs
from instructjax.stages.registry import PIPELINE_ORDER, get_stage
from instructjax.train.metrics import read_metrics

SHARED_KEYS = ("seed", "mesh", "distributed")
# Stage -> its Hugging Face export under WORKDIR/export/ (unless the stage's export_hf is set).
EXPORTED = {"reward": "reward_model", "ppo": "ppo_policy"}
STAGE_TIME = "stage_time.json"
# summary.json's true scores: held-out prompts of the training problems (greedy, sampled),
# then held-out problems (stages/workdirs.DEMO_EVAL_SETS prefixes)
SCORE_KEYS = ("true_score", "true_score_sampled", "heldout_true_score",
              "heldout_true_score_sampled")


def stage_config(config: Any, name: str, workdir: str) -> Any:
    """The config of stage `name`, wired to the pipeline's shared keys and directories."""
    sub = config.stages[name].copy_and_resolve_references()
    with sub.unlocked():
        sub.stage = name
        for key in SHARED_KEYS:
            sub[key] = config[key]
        if name == "pretrain" and not sub.init_from_hf:  # an imported model brings its own
            sub.tokenizer.path = os.path.join(workdir, "tokenizer", workdirs.TOKENIZER_FILE)
        previous = {"sft": "pretrain", "reward": "sft", "ppo": "sft"}.get(name)
        if previous:
            sub.init_from = os.path.join(workdir, previous)
        if name == "ppo":
            sub.ppo.reward_from = os.path.join(workdir, "reward")
        # The pipeline's results leave it in the format every serving stack reads.
        if name in EXPORTED and not sub.export_hf:
            sub.export_hf = os.path.join(workdir, "export", EXPORTED[name])
    return sub


def _finite_or_none(value):
    """summary.json is strict JSON: a NaN / inf metric (a diverged stage) is reported as null."""
    return value if value is None or math.isfinite(value) else None


def _final_eval(rows: list[dict], key: str, first: bool = False):
    values = [r[key] for r in rows if r["split"] == "eval" and key in r]
    if not values:
        return None
    return _finite_or_none(values[0] if first else values[-1])


def summarize(workdir: str, wall: dict[str, float]) -> dict:
    """summary.json contents from the stages' metrics.jsonl files."""
    sft_rows = read_metrics(os.path.join(workdir, "sft"))
    ppo_rows = read_metrics(os.path.join(workdir, "ppo"))
    reward_rows = read_metrics(os.path.join(workdir, "reward"))
    ppo_train = [r for r in ppo_rows if r["split"] == "train"]
    summary = {}
    for key in SCORE_KEYS:
        summary[key] = {"pretrain": _final_eval(sft_rows, key, first=True),  # SFT eval at step 0
                        "sft": _final_eval(sft_rows, key), "ppo": _final_eval(ppo_rows, key)}
    summary.update({
        "reward_accuracy": _final_eval(reward_rows, "accuracy"),
        "ppo_final_kl": _finite_or_none(ppo_train[-1]["kl"]) if ppo_train else None,
        "ppo_final_score": _finite_or_none(ppo_train[-1]["score"]) if ppo_train else None,
        "wall_time_s": wall,
    })
    summary["wall_time_s"]["total"] = sum(v for v in wall.values() if v is not None)
    return summary


def print_table(summary: dict) -> None:
    """The summary as a small text table."""
    fmt = lambda v: "  n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print("\ntrue score on held-out prompts of the training problems (greedy, sampled) and on "
          "held-out problems (greedy, sampled)")
    print("| stage    | greedy | sampled | held-out greedy | held-out sampled | wall s |")
    print("|----------|--------|---------|-----------------|------------------|--------|")
    for name in ("pretrain", "sft", "ppo"):
        wall = summary["wall_time_s"].get(name)
        scores = [fmt(summary[key][name]) for key in SCORE_KEYS]
        print(f"| {name:8s} | {scores[0]:>6s} | {scores[1]:>7s} | {scores[2]:>15s} | "
              f"{scores[3]:>16s} | {'n/a' if wall is None else f'{wall:.0f}':>6s} |")
    print(f"\nreward model accuracy {fmt(summary['reward_accuracy'])}; "
          f"PPO final KL {fmt(summary['ppo_final_kl'])}; "
          f"total wall {summary['wall_time_s']['total']:.0f} s\n", flush=True)


def plot_ppo(workdir: str, path: str) -> None:
    """PNG of the PPO curves: RM score, true score and KL against iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(os.path.join(workdir, "ppo"))
    train = [r for r in rows if r["split"] == "train"]
    evals = [r for r in rows if r["split"] == "eval" and "true_score" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train], [r["score"] for r in train])
    axes[0].set_title("normalised RM score")
    steps = [r["step"] for r in evals]
    for key, style, label in (("true_score", "o-", "greedy"),
                              ("true_score_sampled", "s-", "sampled"),
                              ("heldout_true_score", "o:", "greedy, held-out problems"),
                              ("heldout_true_score_sampled", "s:", "sampled, held-out problems")):
        if all(key in r for r in evals):
            axes[1].plot(steps, [r[key] for r in evals], style, label=label)
    axes[1].set_title("true score (held-out prompts)")
    axes[1].legend(fontsize=7, loc="center right")
    axes[2].plot([r["step"] for r in train], [r["kl"] for r in train])
    axes[2].set_title("KL(policy || SFT) per sequence")
    for ax in axes:
        ax.set_xlabel("PPO iteration")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(config: Any, workdir: str) -> dict:
    """Runs every stage in order (skipping finished ones) and writes the summary."""
    os.makedirs(workdir, exist_ok=True)
    wall = {}
    for name in PIPELINE_ORDER:
        stage_dir = os.path.join(workdir, name)
        start = time.perf_counter()
        get_stage(name)(stage_config(config, name, workdir), stage_dir)
        elapsed = time.perf_counter() - start
        timing_path = os.path.join(stage_dir, STAGE_TIME)
        if os.path.exists(timing_path):  # cumulative over resumed / skipped invocations
            with open(timing_path, encoding="utf-8") as f:
                elapsed += json.load(f)["wall_s"]
        if common.is_main_process():
            with open(timing_path, "w", encoding="utf-8") as f:
                json.dump({"wall_s": elapsed}, f)
        wall[name] = elapsed
    summary = summarize(workdir, wall)
    if common.is_main_process():
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, allow_nan=False)
        plot_ppo(workdir, os.path.join(workdir, "ppo_curves.png"))
        print_table(summary)
    return summary
