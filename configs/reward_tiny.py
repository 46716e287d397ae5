"""Reward model on the demo task's K=4 ranked answers, trunk from the tiny SFT model.

Command (after configs/sft_tiny.py wrote /tmp/ijx/sft):
  python -m experiments.run --config=configs/reward_tiny.py --workdir=/tmp/ijx/reward \
      --config.init_from=/tmp/ijx/sft
Needs: CPU, a few minutes. Produces: metrics.jsonl with eval `accuracy` (pairwise, held-out
comparisons) and WORKDIR/reward_stats.json (score mean/std over SFT samples, used by PPO).
"""

from configs import base


def get_config():
    config = base.get_base("reward", model="tiny")
    config.init_from = "/tmp/ijx/sft"
    config.data.seq_len = 48
    config.train.update(dict(
        steps=600, batch_size=16, learning_rate=1e-3, warmup_steps=20, weight_decay=0.0,
        eval_every=200, eval_batches=13, log_every=20, checkpoint_every=200))
    # reward statistics from SFT samples at the PPO sampling temperature (configs/ppo_tiny.py)
    config.eval.temperature = 1.0
    return config
