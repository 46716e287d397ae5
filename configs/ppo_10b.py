"""PPO RLHF of a 10B LLaMA-style policy on 64 H200 (8 nodes x 8): the scaled target.

Models (preset "10b": E 5120, L 36, H 40, K 8, D 128, F 13824, V 32000, untied head):
  policy      10,237,096,960 params (count_params), float32 master weights + AdamW
  value head  5,121 (E + 1) on the policy's trunk (ppo.critic = "shared")
  reference   10,237,096,960, frozen, bfloat16 (ppo.frozen_dtype)
  reward model 10,237,102,081 (trunk + scalar head), frozen, bfloat16
Mesh: data 1 x fsdp 8 x tensor 8 = 64 devices. Tensor parallelism (heads, kv heads, MLP,
vocab) stays inside a node's NVLink domain; FSDP (ZeRO-3 over `embed`) spans the 8 nodes;
batch dims split 8 ways. Compute bfloat16 (model.dtype), logits and losses float32, remat
"full" on every scanned layer.
Rollout: decodes from a bf16 copy of the policy gathered over fsdp once per iteration
(ppo.rollout_weights="gathered", 2.6 GB per device): decoding from the fsdp-sharded float32
weights would all-gather them across nodes for every generated token (~4.5 GB per device
per token).
Sizes: 128 prompts x 4 samples = 512 rollout rows per iteration, prompts up to 512 tokens,
responses up to 512 (S = 1024). Rollout micro-batch: all 512 rows in one generate (the KV
cache is ~1.2 GB per device, no need to split). Log-prob micro-batch = update minibatch =
ppo.minibatch_size = 64 sequences (8 per batch shard); 2 epochs x 8 minibatches = 16
updates per iteration, no gradient accumulation (one minibatch is one optimizer step).
Check before spending the pod (compiles every program for this mesh on virtual CPU devices,
prints per-device memory, FLOPs and step-time estimates; exits 1 naming a program that does
not fit 125 GB):
  python -m experiments.run --config=configs/ppo_10b.py --workdir=/tmp/ppo10b_dry \
      --config.dry_run=True
Run (after configs/sft_10b.py and configs/reward_10b.py):
  python -m experiments.run --config=configs/ppo_10b.py --workdir=DIR \
      --config.init_from=SFT_DIR --config.ppo.reward_from=REWARD_DIR --config.data.path=PROMPTS
"""

from configs import base, hardware


def get_config():
    config = base.get_base("ppo", model="10b")
    config.hardware.update(hardware.h200(64))
    config.mesh.update(dict(data=1, fsdp=8, tensor=8))
    config.model.update(dict(dtype="bfloat16", param_dtype="float32", scan_layers=True,
                             remat_policy="full", attention_impl="cudnn"))
    config.distributed.enabled = True  # one process per host; coordinator from the cluster env
    config.ppo.update(dict(
        prompts_per_iteration=128, num_samples=4, minibatch_size=64, epochs=2,
        max_prompt_len=512, max_new_tokens=512, temperature=1.0,
        frozen_dtype="bfloat16", critic="shared", rollout_weights="gathered",
        kl_controller="fixed", init_kl_coef=0.02))  # InstructGPT's beta
    config.eval.update(dict(num_prompts=256, batch_size=256, max_prompt_len=512,
                            max_new_tokens=512))
    config.train.update(dict(steps=500, learning_rate=1e-6, warmup_steps=10, decay="constant",
                             weight_decay=0.0, b2=0.95, grad_clip=1.0, eval_every=50,
                             checkpoint_every=25))
    return config
