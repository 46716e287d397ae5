"""Recipe: PPO RLHF of the Qwen2.5-0.5B SFT policy (open_qwen_sft_pclue.py) against the
HH reward model (open_qwen_reward_hh.py), on Anthropic HH prompts.

Data: HH-RLHF prompts, one {"prompt": "\\n\\nHuman: ... \\n\\nAssistant:"} per line (the
context of each transcript up to its last answer; any prompt format we read works);
malformed records are skipped and counted (`data.skip_malformed`).
Models: policy 494,032,768 params (float32 + AdamW) with a shared value head, frozen
reference and reward model in bfloat16. Hardware: one 8 x H200 node (sized below).
Each turn ends at <|im_end|> or <|endoftext|> (the tokenizer's EOS ids).
`--config.ppo.reward_from` may also name a Hugging Face
`...ForSequenceClassification` directory (one label); its score statistics are then
computed here on the SFT policy's samples.
Check: python -m experiments.run --config=configs/open_qwen_ppo_hh.py \
  --workdir=/tmp/qppo_dry --config.dry_run=True
Run:   python -m experiments.run --config=configs/open_qwen_ppo_hh.py --workdir=/runs/q_ppo \
  --config.init_from=/runs/q_sft --config.ppo.reward_from=/runs/q_rm \
  --config.data.path=/data/hh-rlhf/harmless-base/train_prompts.jsonl \
  --config.export_hf=/runs/q_ppo_hf
"""

from configs import base, hardware


def get_config():
    config = base.get_base("ppo", model="qwen2.5-0.5b")
    config.hardware.update(hardware.h200(8))
    config.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    config.model.update(dict(dtype="bfloat16", param_dtype="float32", scan_layers=True,
                             remat_policy="full", attention_impl="cudnn"))
    config.chat.format = "model"
    config.data.seq_len = 1024
    # HH's prompt dumps hold a few records that continue after the last Human turn: skip
    # them (counted, the first named) rather than stop
    config.data.skip_malformed = True
    config.ppo.update(dict(
        prompts_per_iteration=64, num_samples=2, minibatch_size=32, epochs=2,
        max_prompt_len=512, max_new_tokens=256, temperature=1.0,
        frozen_dtype="bfloat16", critic="shared", kl_controller="fixed", init_kl_coef=0.05))
    config.eval.update(dict(num_prompts=64, batch_size=64, max_prompt_len=512,
                            max_new_tokens=256))
    config.train.update(dict(steps=300, learning_rate=1e-6, warmup_steps=10, decay="constant",
                             weight_decay=0.0, eval_every=50, checkpoint_every=25))
    return config
