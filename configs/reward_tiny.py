"""Reward model on the demo task's K=4 ranked answers, trunk from the tiny SFT model.

Command (after configs/sft_tiny.py wrote /tmp/ijx/sft):
  python -m experiments.run --config=configs/reward_tiny.py --workdir=/tmp/ijx/reward \
      --config.init_from=/tmp/ijx/sft
Needs: CPU, a few minutes. Produces: metrics.jsonl with eval `accuracy` (pairwise, held-out
comparisons) and WORKDIR/reward_stats.json (score mean/std over SFT samples, used by PPO).
"""

from configs import base, ppo_tiny


def get_config():
    config = base.get_base("reward", model="tiny")
    config.init_from = "/tmp/ijx/sft"
    config.data.seq_len = 48
    config.train.update(dict(
        steps=600, batch_size=16, learning_rate=1e-3, warmup_steps=20, weight_decay=0.0,
        eval_every=200, eval_batches=13, log_every=20, checkpoint_every=200))
    # Reward statistics (PPO's score normalisation) from SFT samples drawn as PPO draws them:
    # the same prompt length, response length and temperature as configs/ppo_tiny.py.
    sampling = ppo_tiny.get_config().ppo
    config.eval.update(dict(max_prompt_len=sampling.max_prompt_len,
                            max_new_tokens=sampling.max_new_tokens,
                            temperature=sampling.temperature, top_k=sampling.top_k,
                            top_p=sampling.top_p))
    return config
