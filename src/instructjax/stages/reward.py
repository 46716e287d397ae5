"""Stage 2: the reward model, trained on K ranked answers per prompt.

Trunk from the SFT stage plus a scalar head; reward read at each sequence's last real token
(always EOS); loss over all K(K-1)/2 pairs of a prompt in one batch element. After training,
the mean and std of the reward over the SFT policy's own samples are saved for PPO's reward
normalisation (OpenAI's gain/bias).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instructjax.data import chat_encoding, dialogue_sources, formats, loaders
from instructjax.eval import true_score as true_score_lib
from instructjax.model.heads import RewardModel, ScalarHead, reward_head_std
from instructjax.model.transformer import Transformer, init_boxed_params
from instructjax.rlhf import reward_stats, scoring
from instructjax.stages import common, settings, workdirs
from instructjax.train import lifecycle, loop

def comparison_example(comparison: formats.Comparison, *, tokenizer, template, max_length: int,
                       max_turns: int, num_responses: int,
                       on_truncate: chat_encoding.OnTruncate = None) -> dict[str, np.ndarray]:
    """One comparison -> {"tokens" [K, T], "lengths" [K], "ranks" [K]} padded to K."""
    batch = chat_encoding.collate_comparisons(
        [chat_encoding.encode_comparison(comparison, tokenizer, template, max_length=max_length,
                                         max_turns=max_turns, on_truncate=on_truncate)],
        num_responses=num_responses)
    return {name: value[0] for name, value in batch.items()}


def empty_example(num_responses: int, seq_len: int) -> dict[str, np.ndarray]:
    """A padding example with no responses (no pairs, zero loss weight)."""
    return {"tokens": np.zeros((num_responses, seq_len), np.int32),
            "lengths": np.zeros((num_responses,), np.int32),
            "ranks": np.full((num_responses,), -1, np.int32)}


def reward_loss_fn(model: RewardModel):
    """(params, batch, rng) -> (pair-loss sum over prompts, prompts, {"accuracy"}).

    batch: tokens int32 [B, K, T] right-padded, lengths int32 [B, K], ranks int32 [B, K].
    """

    def loss_fn(params, batch, rng):
        del rng
        tokens_BKT = batch["tokens"]
        B, K, T = tokens_BKT.shape
        lengths = batch["lengths"].reshape(B * K)
        mask = (jnp.arange(T)[None, :] < lengths[:, None]).astype(jnp.int32)
        rewards_BK = scoring.score_sequences(model, params, tokens_BKT.reshape(B * K, T),
                                             mask).reshape(B, K)
        loss_sum, prompts, correct, pairs = scoring.ranked_pair_loss(rewards_BK, batch["ranks"])
        return loss_sum, prompts, {"accuracy": (correct, pairs)}

    return loss_fn


def _num_responses(configured: int, sources) -> int:
    if configured:
        return configured
    return max(len(src[i].responses) for src in sources.values() for i in range(len(src)))


def reward_statistics(s: settings.StageSettings, workdir: str, rm: RewardModel, rm_params,
                      mesh, tokenizer, policy_cfg) -> dict[str, float]:
    """Mean/std of the RM score over the SFT policy's (`init_from`'s) samples on training
    prompts."""
    policy_params = workdirs.load_transformer_params(s.init_from, policy_cfg, mesh)
    r = s.reward
    tokens, mask = true_score_lib.encode_prompts(
        _stat_prompts(s, workdir), tokenizer, s.chat.template_for(tokenizer),
        max_prompt_len=r.stats_prompt_len, max_turns=s.chat.max_turns)
    return reward_stats.score_statistics(
        Transformer(policy_cfg), policy_params, rm, rm_params, tokens, mask,
        sampling=r.stats_sampling, eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
        batch_size=r.stats_batch_size, seed=s.seed)


def _stat_prompts(s: settings.StageSettings, workdir: str) -> list[formats.Prompt]:
    count = s.reward.stats_samples
    if s.data.path:
        # user comparison data: their contexts are the prompts the policy will see
        records, _ = dialogue_sources.read_records(s.data.path, "comparison",
                                                   skip_malformed=s.data.skip_malformed)
        return [formats.Prompt(r.context) for r in records[:count]]
    prompts_path = workdirs.demo_task_paths(s.data, workdir)["prompts_train"]
    records, _ = dialogue_sources.read_records(prompts_path, "prompt")
    return records[:count]


def run(config: Any, workdir: str) -> loop.LoopResult:
    """Trains (or resumes, or skips) the reward model in `workdir` from the SFT stage."""
    s = workdirs.start_stage(config, workdir)
    model_cfg, tokenizer, mesh = workdirs.from_earlier_stage(s, workdir, ("sft", "pretrain"))
    rm = RewardModel(model_cfg)

    train_paths, eval_paths = workdirs.stage_data_paths(s.data, workdir, "comparisons_train",
                                                        "comparisons_eval")
    sources = common.main_process_first(lambda: dialogue_sources.build_comparison_source(
        train_paths, eval_paths, os.path.join(workdir, "data", "tfds"),
        eval_percent=s.data.eval_percent, skip_malformed=s.data.skip_malformed), "tfds")
    seq_len, batch_size = s.data.seq_len, s.train_batch_size
    k = _num_responses(s.reward.num_responses, sources)
    to_example = functools.partial(comparison_example, tokenizer=tokenizer,
                                   template=s.chat.template_for(tokenizer), max_length=seq_len,
                                   max_turns=s.chat.max_turns, num_responses=k,
                                   on_truncate=chat_encoding.TruncationLog(
                                       "reward", f"data.seq_len={seq_len}",
                                       echo=common.is_main_process()))
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    per_process_batch = batch_size // jax.process_count()

    def batches(split, **kwargs):
        return loaders.make_example_batches(sources[split], to_example,
                                            batch_size=per_process_batch,
                                            pad_example=empty_example(k, seq_len), **shard,
                                            **kwargs)

    def init_params_boxed(rng):
        return init_boxed_params(rm, rng)

    def load_initial_params():
        return {"trunk": workdirs.load_transformer_params(s.init_from, model_cfg, mesh),
                "head": _init_head(model_cfg.embed_dim, s.seed)}

    task = loop.SupervisedTask(
        name="reward", init_params_boxed=init_params_boxed, loss_fn=reward_loss_fn(rm),
        make_train_batches=lambda: batches("train", seed=s.seed),
        make_eval_batches=lambda: batches("eval", seed=0, num_epochs=1, shuffle=False),
        load_initial_params=load_initial_params, tokens_per_batch=batch_size * k * seq_len)
    workdirs.write_run_info(workdir, "reward", model_cfg)
    result = loop.run_supervised(task, s.loop, s.optim, mesh, workdir)

    if result.finished and not os.path.exists(os.path.join(workdir, workdirs.REWARD_STATS)):
        stats = reward_statistics(s, workdir, rm, result.state.params, mesh, tokenizer,
                                  model_cfg)
        workdirs.write_reward_stats(workdir, stats)
        lifecycle.say("reward", f"score over SFT samples: mean {stats['mean']:.4f} "
                                f"std {stats['std']:.4f} (n={stats['num_samples']})")
    return result


def _init_head(embed_dim: int, seed: int):
    """Fresh reward-head params only (the trunk comes from SFT)."""
    head = ScalarHead(reward_head_std(embed_dim))
    params = head.init(jax.random.key(seed), jnp.zeros((1, 1, embed_dim), jnp.float32))
    return nn.meta.unbox(params["params"])
