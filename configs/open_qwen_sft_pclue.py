"""Recipe: SFT of an open model, Qwen2.5-0.5B-Instruct, on pCLUE in its own chat format.

Weights (494,032,768 params, bf16 on disk): `huggingface-cli download
Qwen/Qwen2.5-0.5B-Instruct --local-dir /models/Qwen2.5-0.5B-Instruct` on a machine with
internet, then copy the directory here (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with its ChatML chat template, generation_config.json).
Data: pCLUE (github.com/CLUEbenchmark/pCLUE, `datasets/pCLUE_train_*.json`, one
{"input", "target"} JSON object per line; read as single-turn dialogues as they are).
Hardware: one 8 x H200 node (sized below); any single GPU with 24 GB runs it with
--config.mesh.fsdp=1 --config.train.batch_size=16. float32 master weights + AdamW (about
8 GB), bfloat16 compute, the model's ChatML template (`chat.format="model"`): the loss
covers each answer and its <|im_end|>.
Check (no weights needed: the preset "qwen2.5-0.5b" has the same shape):
  python -m experiments.run --config=configs/open_qwen_sft_pclue.py --workdir=/tmp/q_dry \
      --config.dry_run=True
Run:
  python -m experiments.run --config=configs/open_qwen_sft_pclue.py --workdir=/runs/q_sft \
      --config.init_from_hf=/models/Qwen2.5-0.5B-Instruct \
      --config.data.path='/data/pCLUE/datasets/pCLUE_train_*.json'
Next: configs/open_qwen_reward_hh.py, then configs/open_qwen_ppo_hh.py; talk to any of them
with `python -m experiments.chat --model=/runs/q_sft`.
"""

from configs import base, hardware


def get_config():
    config = base.get_base("sft", model="qwen2.5-0.5b")
    config.hardware.update(hardware.h200(8))
    config.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    config.model.update(dict(dtype="bfloat16", param_dtype="float32", scan_layers=True,
                             remat_policy="full", attention_impl="cudnn"))
    config.chat.format = "model"
    config.export_hf = ""  # e.g. /runs/q_sft_hf to hand the result to a serving stack
    config.data.seq_len = 1024
    config.train.update(dict(steps=2000, batch_size=64, learning_rate=1e-5, warmup_steps=50,
                             decay="cosine", weight_decay=0.0, eval_every=200,
                             checkpoint_every=200, log_every=10))
    config.eval.update(dict(num_prompts=64, batch_size=64, max_prompt_len=512,
                            max_new_tokens=64))
    return config
