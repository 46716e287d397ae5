"""Pretrain the tiny LLaMA-style model on the built-in mixed Chinese/English demo corpus.

Command:
  python -m experiments.run --config=configs/pretrain_tiny.py --workdir=/tmp/ijx/pretrain
Needs: any CPU (2 cores are enough). Takes about 2 minutes.
Produces: WORKDIR/metrics.jsonl whose eval loss starts near 7.3 (a little above ln 1024 = 6.93,
the vocabulary: random initial logits are not uniform) and falls under 1 (0.60 measured),
WORKDIR/checkpoints/, WORKDIR/tokenizer.model, TensorBoard events.
"""

from configs import base


def get_config():
    config = base.get_base("pretrain", model="tiny")
    config.data.seq_len = 128
    config.train.update(dict(
        steps=300, batch_size=16, learning_rate=3e-3, warmup_steps=30, weight_decay=0.01,
        eval_every=100, eval_batches=4, log_every=20, checkpoint_every=100))
    return config
