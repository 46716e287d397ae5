"""Reward model on the 1.1B trunk (preset "1b": 1,100,050,433 params with the scalar head)
on one 8 x H200 node.

float32 + AdamW, bfloat16 compute, remat "full"; mesh data 1 x fsdp 8 x tensor 1.
Batch 64 prompts x K = 4 responses x 1024 tokens, no accumulation.
Check: python -m experiments.run --config=configs/reward_1b.py --workdir=/tmp/rm1b_dry \
    --config.dry_run=True
Run: ... --workdir=DIR --config.init_from=SFT_DIR --config.data.path=COMPARISONS.jsonl
"""

from configs import base, hardware


def get_config():
    config = base.get_base("reward", model="1b")
    config.hardware.update(hardware.h200(8))
    config.mesh.update(dict(data=1, fsdp=8, tensor=1))
    config.model.update(dict(dtype="bfloat16", param_dtype="float32", scan_layers=True,
                             remat_policy="full", attention_impl="cudnn"))
    config.data.seq_len = 1024
    config.reward.num_responses = 4
    config.train.update(dict(steps=1000, batch_size=64, learning_rate=1e-5, warmup_steps=50,
                             decay="cosine", weight_decay=0.0, eval_every=100,
                             checkpoint_every=100, log_every=10))
    return config
