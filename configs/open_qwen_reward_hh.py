"""Recipe: a reward model on Anthropic HH-RLHF from the Qwen2.5-0.5B SFT of
open_qwen_sft_pclue.py (trunk from the SFT model, a fresh scalar head).

Data: Anthropic HH-RLHF (github.com/anthropics/hh-rlhf, e.g.
`harmless-base/train.jsonl.gz`: {"chosen", "rejected"} transcripts in "\\n\\nHuman: ...
\\n\\nAssistant: ..." form, read as they are: the shared context becomes the prompt, the two
last answers a ranked pair).
Hardware: one 8 x H200 node (sized below; 1 GPU with 40 GB runs it with a smaller batch).
The SFT workdir's tokenizer and chat template (ChatML) carry over. When it finishes,
WORKDIR/reward_stats.json holds the score statistics PPO normalises with, and with
`--config.export_hf=DIR` the model is written as Qwen2ForSequenceClassification (one label),
the form TRL and OpenRLHF read.
Check: python -m experiments.run --config=configs/open_qwen_reward_hh.py \
  --workdir=/tmp/qrm_dry --config.dry_run=True
Run:   python -m experiments.run --config=configs/open_qwen_reward_hh.py --workdir=/runs/q_rm \
  --config.init_from=/runs/q_sft --config.data.path=/data/hh-rlhf/harmless-base/train.jsonl.gz \
  --config.data.eval_path=/data/hh-rlhf/harmless-base/test.jsonl.gz
"""

from configs import base, hardware


def get_config():
    config = base.get_base("reward", model="qwen2.5-0.5b")
    config.hardware.update(hardware.h200(8))
    config.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    config.model.update(dict(dtype="bfloat16", param_dtype="float32", scan_layers=True,
                             remat_policy="full", attention_impl="cudnn"))
    config.chat.format = "model"
    config.data.seq_len = 1024
    config.reward.update(dict(num_responses=2, stats_samples=512))
    config.eval.update(dict(batch_size=64, max_prompt_len=512, max_new_tokens=128))
    config.train.update(dict(steps=1000, batch_size=64, learning_rate=9e-6, warmup_steps=50,
                             decay="cosine", weight_decay=0.0, eval_every=100,
                             checkpoint_every=100, log_every=10))
    return config
