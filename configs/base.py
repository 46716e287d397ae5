"""Keys every experiment config has, with their defaults; `get_base(stage)` is the schema.

`experiments/run.py` rejects any key a config file adds that is not here, naming it and the
valid keys, so a misspelling never silently becomes a new, unused setting.
"""

import ml_collections

from configs import models


def get_base(stage: str, model: str = "tiny") -> ml_collections.ConfigDict:
    """A complete config for `stage` with the model preset `model`."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    c.init_from = ""        # checkpoint workdir of an earlier stage
    c.dry_run = False

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.distributed = ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address="", num_processes=1, process_id=0))

    c.model = models.get(model)
    c.tokenizer = ml_collections.ConfigDict(dict(
        path="",            # an existing sentencepiece .model; empty = train one on the corpus
        vocab_size=1024, model_type="bpe", max_training_lines=200_000))

    c.data = ml_collections.ConfigDict(dict(
        path="",            # file, glob or directory of JSONL; empty = built-in demo data
        eval_path="",       # held-out JSONL; empty = the last eval_percent of `path`
        eval_percent=5,
        text_field="text",
        seq_len=128,
        demo_seed=0,
    ))

    # ChatYuan's unified Input->Output format: "用户：{q}\n小元：{a}".
    c.chat = ml_collections.ConfigDict(dict(user="用户", assistant="小元", max_turns=8))
    c.sft = ml_collections.ConfigDict(dict(train_on="all"))   # all | last assistant turn(s)
    c.reward = ml_collections.ConfigDict(dict(
        num_responses=0,       # K to pad comparisons to; 0 = the largest K in the data
        stats_samples=256,     # SFT-policy samples for the reward mean/std saved for PPO
    ))
    # Generation-based evaluation (true score of greedy and sampled answers on held-out
    # prompts of the demo task; skipped for user data, which has no true score).
    c.eval = ml_collections.ConfigDict(dict(
        num_prompts=64, batch_size=64, max_prompt_len=96, max_new_tokens=24,
        temperature=0.7, top_k=0, top_p=1.0))

    c.train = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=16, learning_rate=3e-4, warmup_steps=100, decay="cosine",
        min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0,
        grad_accum_steps=1, eval_every=200, eval_batches=8, log_every=20,
        checkpoint_every=500, keep_checkpoints=3, async_checkpoint=True,
    ))
    return c
