"""Reward model on the 10B trunk (preset "10b") on 64 H200: the scorer PPO uses.

Model: 10,237,102,081 params (count_params 10,237,096,960 + scalar head E + 1), float32 +
AdamW, bfloat16 compute, remat "full". Mesh data 1 x fsdp 8 x tensor 8.
Batch 64 prompts x K = 4 ranked responses x 1024 tokens (256 sequences, 6 pairs per prompt),
in 2 gradient-accumulation micro-batches of 32 prompts (4 per batch shard).
Check: python -m experiments.run --config=configs/reward_10b.py --workdir=/tmp/rm10b_dry \
    --config.dry_run=True
Run: ... --workdir=DIR --config.init_from=SFT_DIR --config.data.path=COMPARISONS.jsonl
"""

from configs import base, hardware


def get_config():
    config = base.get_base("reward", model="10b")
    config.hardware.update(hardware.h200(64))
    config.mesh.update(dict(data=1, fsdp=8, tensor=8))
    config.model.update(dict(dtype="bfloat16", param_dtype="float32", scan_layers=True,
                             remat_policy="full", attention_impl="cudnn"))
    config.distributed.enabled = True
    config.data.seq_len = 1024
    config.reward.num_responses = 4
    config.train.update(dict(steps=1000, batch_size=64, grad_accum_steps=2,
                             learning_rate=5e-6, warmup_steps=50, decay="cosine",
                             weight_decay=0.0, eval_every=100, checkpoint_every=100,
                             log_every=10))
    return config
