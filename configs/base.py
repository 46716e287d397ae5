"""Each stage's keys with their defaults; `get_base(stage)` is that stage's schema.

A stage's schema holds only the keys it reads (`STAGE_SECTIONS`, minus `UNUSED_KEYS`), and
`experiments/run.py` rejects any other key a config file or override sets, naming it and the
valid keys: a misspelling, or a key another stage reads, never silently does nothing.

`train.steps` counts optimiser steps in pretrain, SFT and reward, and PPO iterations in `ppo`
(one iteration: a rollout batch of ppo.prompts_per_iteration x ppo.num_samples answers, then
ppo.epochs passes of minibatch updates over it).
"""

import ml_collections

from configs import models
from instructjax.stages import registry


def get_base(stage: str, model: str = "tiny") -> ml_collections.ConfigDict:
    """A complete config for `stage` with the model preset `model`."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    c.init_from = ""        # checkpoint workdir of an earlier stage (or a Hugging Face dir)
    c.init_from_hf = ""     # a Hugging Face model dir (config.json + safetensors) to start from
    c.export_hf = ""        # when the stage finishes, write its result here as a HF model dir
    c.dry_run = False

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.distributed = ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address="", num_processes=1, process_id=0))
    # The machine a config is sized for; read by the ahead-of-time check (config.dry_run).
    c.hardware = ml_collections.ConfigDict(dict(
        name="",                  # e.g. "64 x NVIDIA H200 SXM"
        num_devices=0,            # devices of the target mesh; 0 = the devices present
        memory_per_device_gb=0.0,  # usable memory per device, 1e9 bytes; 0 = no limit check
        peak_tflops=0.0,          # dense bf16 peak per device; 0 = no step-time estimate
        hbm_gbps=0.0,             # memory bandwidth per device, GB/s; 0 = compute bound only
    ))

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
        # dialogue data: skip malformed records (counted, with a warning naming the first
        # file:line) instead of stopping at the first; real dumps hold a few (HH-RLHF's prompts)
        skip_malformed=False,
    ))

    # ChatYuan's unified Input->Output format: "用户：{q}\n小元：{a}".
    # format "model": the tokenizer's own chat template (tokenizer_config.json) instead.
    c.chat = ml_collections.ConfigDict(dict(user="用户", assistant="小元", max_turns=8,
                                            format="chatyuan"))
    c.sft = ml_collections.ConfigDict(dict(train_on="all"))   # all | last assistant turn(s)
    c.reward = ml_collections.ConfigDict(dict(
        num_responses=0,       # K to pad comparisons to; 0 = the largest K in the data
        stats_samples=256,     # SFT-policy samples for the reward mean/std saved for PPO
    ))
    # PPO RLHF (stage 3). Defaults follow OpenAI's lm-human-preferences (PPO-DETAILS.md).
    c.ppo = ml_collections.ConfigDict(dict(
        reward_from="",            # workdir of the finished reward stage
        prompts_per_iteration=64,  # rollout batch (prompts) per PPO iteration
        num_samples=1,             # responses per prompt
        minibatch_size=16,         # sequences per gradient step
        epochs=4,                  # passes over each rollout batch
        max_prompt_len=96, max_new_tokens=24,
        temperature=0.7, top_k=0, top_p=1.0,
        gamma=1.0, lam=0.95, clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.1, entropy_coef=0.0,
        whiten_advantages=True,
        kl_estimator="k1",         # k1 | k3
        kl_controller="adaptive",  # adaptive | fixed
        init_kl_coef=0.15, kl_target=6.0, kl_horizon=10_000.0,
        reward_clip=0.0,           # clip the normalised score to +-this; 0 = off
        penalize_missing_eos=True, missing_eos_penalty=-1.0,
        ptx_coef=0.0,              # PPO-ptx: weight of the pretraining LM loss (0 = off)
        ptx_batch_size=8,
        ptx_data_path="",          # pretraining text JSONL for PPO-ptx; empty = the demo corpus
        critic="shared",           # shared (value head on the policy trunk) | separate (from the RM)
        critic_learning_rate=5e-5,
        frozen_dtype="float32",    # dtype of the frozen reference and reward models
        # train: decode from the training params as sharded | gathered: from a copy in
        # model.dtype gathered over fsdp, made once per iteration (no per-token weight gather)
        rollout_weights="train",
    ))

    # Generation-based evaluation (true score of greedy and sampled answers on held-out
    # prompts of the demo task; skipped for user data, which has no true score).
    c.eval = ml_collections.ConfigDict(dict(
        num_prompts=64, batch_size=64, max_prompt_len=96, max_new_tokens=24,
        temperature=0.7, top_k=0, top_p=1.0,
        num_samples=1))          # sampled answers per prompt for true_score_sampled

    c.train = ml_collections.ConfigDict(dict(
        steps=1000, batch_size=16, learning_rate=3e-4, warmup_steps=100, decay="cosine",
        min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip=1.0,
        grad_accum_steps=1, eval_every=200, eval_batches=8, log_every=20,
        checkpoint_every=500, keep_checkpoints=3, async_checkpoint=True,
        # non-finite loss / grad norm (PPO: also reward, KL) steps a run may skip, each logged,
        # before it stops naming the step; 0 = stop at the first (train/divergence.py)
        max_bad_steps=0,
    ))
    if stage == "pipeline":
        return _pipeline_base(c, model)
    return _stage_schema(c, stage)


# Every stage has these; the rest by STAGE_SECTIONS.
COMMON_KEYS = ("stage", "seed", "dry_run", "mesh", "distributed", "hardware")
STAGE_SECTIONS = {
    "tokenizer": ("tokenizer", "data"),
    "pretrain": ("init_from_hf", "export_hf", "model", "tokenizer", "data", "train"),
    "sft": ("init_from", "init_from_hf", "export_hf", "model", "data", "chat", "sft", "eval",
            "train"),
    "reward": ("init_from", "init_from_hf", "export_hf", "model", "data", "chat", "reward",
               "eval", "train"),
    "ppo": ("init_from", "init_from_hf", "export_hf", "model", "data", "chat", "ppo", "eval",
            "train"),
}
# Keys of those sections a stage still does not read. PPO logs every iteration, has no
# held-out loss batches, and its batch is ppo.prompts_per_iteration x ppo.num_samples rows
# in ppo.minibatch_size minibatches, not train.batch_size; the reward model's score
# statistics sample one answer per prompt from its own prompt list.
UNUSED_KEYS = {
    "tokenizer": ("data.seq_len", "data.eval_percent", "data.skip_malformed"),
    "pretrain": ("data.skip_malformed",),
    "sft": ("data.text_field",),
    "reward": ("data.text_field", "eval.num_prompts", "eval.num_samples"),
    "ppo": ("data.text_field", "train.batch_size", "train.grad_accum_steps",
            "train.eval_batches", "train.log_every"),
}


def _stage_schema(full: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """`full` cut to the keys `stage` reads (an unknown stage keeps every key: run.py names
    it as unknown before anything reads the config)."""
    if stage not in STAGE_SECTIONS:
        return full
    c = ml_collections.ConfigDict({key: full[key] for key in COMMON_KEYS + STAGE_SECTIONS[stage]})
    for dotted in UNUSED_KEYS.get(stage, ()):
        section, key = dotted.split(".")
        del c[section][key]  # ConfigDict supports deletion of a field
    return c


# The pipeline's own keys: everything else is set per stage (`stages.<stage>.<key>`), so a
# top-level `train.steps` or `data.path` would be accepted and do nothing.
PIPELINE_KEYS = ("stage", "seed", "dry_run", "mesh", "distributed")


def _pipeline_base(full: ml_collections.ConfigDict, model: str) -> ml_collections.ConfigDict:
    """The pipeline schema: its shared keys plus one full config per stage (`stages`)."""
    c = ml_collections.ConfigDict({key: full[key] for key in PIPELINE_KEYS})
    # one full config per stage; run in this order, each in WORKDIR/<stage>/
    c.stages = ml_collections.ConfigDict({name: get_base(name, model) for name in PIPELINE})
    return c


PIPELINE = registry.PIPELINE_ORDER

# The demo task's true-score eval, shared by the tiny SFT and PPO configs so their scores are
# comparable: every held-out prompt (~5 per held-out problem), the PPO sampling temperature
# and response length, 4 samples per prompt (800 answers: standard error ~0.015).
TINY_EVAL = dict(num_prompts=200, batch_size=200, max_prompt_len=64, max_new_tokens=16,
                 temperature=1.0, num_samples=4)
