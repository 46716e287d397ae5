"""PPO's divergence guard: a NaN reward at iteration k stops the stage at k naming the metric
and the prompt position, with no checkpoint from k on; resumed with train.max_bad_steps=1 it
skips that iteration's updates (the KL coefficient untouched) and finishes."""

import math
import os

import pytest

from instructjax.stages import ppo as ppo_stage
from instructjax.train import divergence
from instructjax.train.metrics import read_metrics
from test_ppo_stage import ppo_config, stage_dirs  # noqa: F401 (fixture)


ORIGINAL_REWARD_FORWARD = ppo_stage.exp_lib.make_reward_forward


def poison_reward_call(monkeypatch, bad_call: int):
    """Makes the `bad_call`-th reward forward (1-based) of the next PPO run return NaN."""
    original = ORIGINAL_REWARD_FORWARD

    def make(rm, hp):
        forward, calls = original(rm, hp), [0]

        def poisoned(params, tokens, mask):
            calls[0] += 1
            scores = forward(params, tokens, mask)
            return scores * math.nan if calls[0] == bad_call else scores
        return poisoned

    monkeypatch.setattr(ppo_stage.exp_lib, "make_reward_forward", make)


def checkpoint_steps(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def test_nan_reward_stops_at_iteration_then_resume_skips_it(stage_dirs, tmp_path, monkeypatch):
    root, _ = stage_dirs
    workdir = str(tmp_path)
    config = ppo_config(root, steps=5)
    config.train.checkpoint_every = 2
    poison_reward_call(monkeypatch, bad_call=3)
    with pytest.raises(divergence.DivergenceError) as err:
        ppo_stage.run(config, workdir)
    message = str(err.value)
    assert "iteration 3" in message and "score_raw=nan" in message and "kl" not in message.split(
        "(data")[0].replace("score_raw", ""), message
    assert '"iteration": 2' in message and "newest checkpoint is iteration 2" in message
    assert checkpoint_steps(workdir) == [2]
    assert [r["step"] for r in read_metrics(workdir) if r["split"] == "diverged"] == [3]

    # the same command with a skip budget: resumes from 2, iteration 3 is skipped
    config.train.max_bad_steps = 1
    poison_reward_call(monkeypatch, bad_call=1)  # the first rollout after resuming = iteration 3
    ppo_stage.run(config, workdir)
    rows = [r for r in read_metrics(workdir) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    skipped = rows[2]
    assert math.isnan(skipped["score_raw"]) and "policy_loss" not in skipped
    assert skipped["skipped_steps"] == 1
    assert skipped["kl_coef"] == rows[3]["kl_coef"]  # the controller ignored the NaN KL
    assert all(math.isfinite(r["score_raw"]) and math.isfinite(r["policy_loss"])
               for r in rows[3:])
