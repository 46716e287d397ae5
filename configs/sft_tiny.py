"""SFT of the tiny pretrained model on the demo arithmetic dialogues (ChatYuan format).

Command (after configs/pretrain_tiny.py wrote /tmp/ijx/pretrain):
  python -m experiments.run --config=configs/sft_tiny.py --workdir=/tmp/ijx/sft \
      --config.init_from=/tmp/ijx/pretrain
Needs: CPU, a few minutes. Produces: metrics.jsonl with eval `loss` and `true_score`
(greedy) / `true_score_sampled` on held-out prompts; step 0 is the pretrained model's score.
"""

from configs import base


def get_config():
    config = base.get_base("sft", model="tiny")
    config.init_from = "/tmp/ijx/pretrain"
    config.data.seq_len = 128
    config.train.update(dict(
        steps=200, batch_size=16, learning_rate=1e-3, warmup_steps=20, weight_decay=0.0,
        eval_every=100, eval_batches=4, log_every=20, checkpoint_every=100))
    config.eval.update(base.TINY_EVAL)  # scores comparable with PPO's
    return config
