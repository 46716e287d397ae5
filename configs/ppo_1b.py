"""PPO RLHF of a 1.1B LLaMA-style policy on one 8 x H200 node: the step before ppo_10b.py.

Models (preset "1b", TinyLlama shape: E 2048, L 22, H 32, K 4, D 64, F 5632, V 32000):
  policy      1,100,048,384 params (count_params), float32 master weights + AdamW
  value head  2,049 (E + 1) on the policy's trunk (ppo.critic = "shared")
  reference   1,100,048,384, frozen, bfloat16 (ppo.frozen_dtype)
  reward model 1,100,050,433 (trunk + scalar head), frozen, bfloat16
Mesh: data 1 x fsdp 8 x tensor 1 (pure FSDP over the node's NVLink), bfloat16 compute,
remat "full". Sizes: 64 prompts x 4 samples = 256 rollout rows, prompts up to 512 tokens,
responses up to 512; rollout in one generate; log-prob micro-batch = minibatch = 32
sequences; 2 epochs x 8 minibatches = 16 updates per iteration, no accumulation.
Check: python -m experiments.run --config=configs/ppo_1b.py --workdir=/tmp/ppo1b_dry \
    --config.dry_run=True
Run: ... --workdir=DIR --config.init_from=SFT_DIR --config.ppo.reward_from=REWARD_DIR \
    --config.data.path=PROMPTS
"""

from configs import base, hardware


def get_config():
    config = base.get_base("ppo", model="1b")
    config.hardware.update(hardware.h200(8))
    config.mesh.update(dict(data=1, fsdp=8, tensor=1))
    config.model.update(dict(dtype="bfloat16", param_dtype="float32", scan_layers=True,
                             remat_policy="full", attention_impl="cudnn"))
    config.ppo.update(dict(
        prompts_per_iteration=64, num_samples=4, minibatch_size=32, epochs=2,
        max_prompt_len=512, max_new_tokens=512, temperature=1.0,
        frozen_dtype="bfloat16", critic="shared", rollout_weights="gathered",
        kl_controller="fixed", init_kl_coef=0.02))
    config.eval.update(dict(num_prompts=256, batch_size=128, max_prompt_len=512,
                            max_new_tokens=512))
    config.train.update(dict(steps=500, learning_rate=3e-6, warmup_steps=10, decay="constant",
                             weight_decay=0.0, eval_every=50, checkpoint_every=25))
    return config
