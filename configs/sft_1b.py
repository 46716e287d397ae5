"""SFT of the 1.1B model (preset "1b": 1,100,048,384 params) on one 8 x H200 node.

float32 master weights + AdamW, bfloat16 compute, remat "full"; mesh data 1 x fsdp 8 x
tensor 1. Batch 128 packed rows x 2048 tokens (262,144 tokens), 2 accumulation micro-batches.
Check: python -m experiments.run --config=configs/sft_1b.py --workdir=/tmp/sft1b_dry \
    --config.dry_run=True
Run: ... --workdir=DIR --config.init_from=PRETRAIN_DIR --config.data.path=DIALOGUES.jsonl
"""

from configs import base, hardware


def get_config():
    config = base.get_base("sft", model="1b")
    config.hardware.update(hardware.h200(8))
    config.mesh.update(dict(data=1, fsdp=8, tensor=1))
    config.model.update(dict(dtype="bfloat16", param_dtype="float32", scan_layers=True,
                             remat_policy="full", attention_impl="cudnn"))
    config.data.seq_len = 2048
    config.train.update(dict(steps=2000, batch_size=128, grad_accum_steps=2,
                             learning_rate=2e-5, warmup_steps=100, decay="cosine",
                             weight_decay=0.1, eval_every=200, checkpoint_every=200,
                             log_every=10))
    return config
