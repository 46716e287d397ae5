"""SFT of the 10B LLaMA-style model (preset "10b") on 64 H200: the policy PPO starts from.

Model: 10,237,096,960 params (count_params), float32 master weights + AdamW, bfloat16 compute,
remat "full". Mesh data 1 x fsdp 8 x tensor 8 (tensor inside a node, FSDP across nodes).
Batch 256 packed rows x 2048 tokens = 524,288 tokens per step, in 4 gradient-accumulation
micro-batches of 64 rows (8 per batch shard).
Check: python -m experiments.run --config=configs/sft_10b.py --workdir=/tmp/sft10b_dry \
    --config.dry_run=True
Run: ... --workdir=DIR --config.init_from=PRETRAIN_DIR --config.data.path=DIALOGUES.jsonl
"""

from configs import base, hardware


def get_config():
    config = base.get_base("sft", model="10b")
    config.hardware.update(hardware.h200(64))
    config.mesh.update(dict(data=1, fsdp=8, tensor=8))
    config.model.update(dict(dtype="bfloat16", param_dtype="float32", scan_layers=True,
                             remat_policy="full", attention_impl="cudnn"))
    config.distributed.enabled = True
    config.data.seq_len = 2048
    config.train.update(dict(steps=2000, batch_size=256, grad_accum_steps=4,
                             learning_rate=1e-5, warmup_steps=100, decay="cosine",
                             weight_decay=0.1, eval_every=200, checkpoint_every=200,
                             log_every=10))
    return config
