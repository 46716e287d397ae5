"""From a batch of rollouts to PPO's frozen buffer, and the PPO update step.

Phases, each a jitted pure function (timed separately by the PPO stage):
  policy_forward   old log-probs, values and entropy under the rollout policy
  reference_forward  log-probs under the frozen SFT reference
  reward_forward   reward-model score of each sequence
  advantages       KL penalty, shaped rewards, GAE, returns, whitening
  update           one clipped-PPO gradient step on a minibatch (+ optional PPO-ptx)
Forward passes run in chunks of the minibatch size, so the update's forward sees the same
shapes and the first minibatch of the first epoch reproduces the old log-probs.

Sharding: every [B, ...] array is split by rows over the batch mesh axes (data, fsdp) when
the phases are traced inside `parallel.mesh.activate(mesh)`. A chunk takes every (B / chunk)-th
row rather than a contiguous block, so each chunk is itself spread over all batch shards and
the chunked forwards move no rows between devices; minibatches (`take`) are re-spread the
same way.
Letters: B sequences, S = P + N tokens, N response tokens, C chunk (minibatch) rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from instructjax.parallel.mesh import shard_rows
from instructjax.rlhf import actor_critic as ac
from instructjax.rlhf import ppo
from instructjax.rlhf.scoring import positions_from_mask, score_sequences
from instructjax.train import divergence
from instructjax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class PPOHyper:
    """The hyperparameters the jitted PPO functions close over (from config.ppo)."""
    prompt_len: int
    temperature: float
    gamma: float
    lam: float
    clip_eps: float
    value_clip_eps: float
    vf_coef: float
    entropy_coef: float
    whiten_advantages: bool
    kl_estimator: str
    reward_clip: float
    missing_eos_penalty: float | None
    ptx_coef: float
    chunk: int  # forward-pass micro-batch (= minibatch size)


@flax.struct.dataclass
class Experience:
    """The frozen PPO buffer of one rollout batch; every field has leading dim B."""
    tokens: jax.Array          # int32 [B, S]
    mask: jax.Array            # int32 [B, S] real prompt + response tokens
    response_mask: jax.Array   # float32 [B, N]
    old_logprobs: jax.Array    # float32 [B, N]
    old_values: jax.Array      # float32 [B, N]
    advantages: jax.Array      # float32 [B, N]
    returns: jax.Array         # float32 [B, N]


def _chunked(fn: Callable, chunk: int, *arrays):
    """fn over [B, ...] arrays in micro-batches of `chunk` rows (lax.map), results re-joined.

    Micro-batch j holds rows j, j + B/C, j + 2B/C, ... (strided), so that with rows sharded
    in contiguous blocks over n devices (C divisible by n) every micro-batch is split evenly
    over all of them. `fn` must treat rows independently; outputs come back in row order.
    """
    B = arrays[0].shape[0]
    if B % chunk:
        raise ValueError(f"rollout batch {B} is not a multiple of the minibatch size {chunk}")
    steps = B // chunk
    split = [jnp.swapaxes(a.reshape((chunk, steps) + a.shape[1:]), 0, 1) for a in arrays]
    out = jax.lax.map(lambda xs: fn(*(shard_rows(x) for x in xs)), tuple(split))
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((B,) + x.shape[2:]), out)


def make_policy_forward(model, hp: PPOHyper):
    """(params, tokens, mask) -> (old_logprobs, values, entropy), each float32 [B, N]."""

    def one(params, tokens, mask):
        logits, values = ac.forward(model, params, tokens, mask)
        logprobs, entropy = ac.response_logprobs(logits, tokens, hp.prompt_len, hp.temperature)
        return logprobs, ac.response_values(values, hp.prompt_len), entropy

    return jax.jit(lambda p, t, m: _chunked(lambda a, b: one(p, a, b), hp.chunk, t, m))


def make_reference_forward(ref_model, hp: PPOHyper):
    """(ref_params, tokens, mask) -> reference log-probs float32 [B, N]."""

    def one(params, tokens, mask):
        mask = mask.astype(jnp.int32)
        logits = ref_model.apply({"params": params}, tokens, positions_from_mask(mask), mask)
        return ac.response_logprobs(logits, tokens, hp.prompt_len, hp.temperature)[0]

    return jax.jit(lambda p, t, m: _chunked(lambda a, b: one(p, a, b), hp.chunk, t, m))


def make_reward_forward(reward_model, hp: PPOHyper):
    """(rm_params, tokens, mask) -> raw reward-model scores float32 [B]."""
    return jax.jit(lambda p, t, m: _chunked(
        lambda a, b: score_sequences(reward_model, p, a, b), hp.chunk, t, m))


def make_advantages(hp: PPOHyper):
    """Builds the buffer from the forward passes' outputs; returns (Experience, stats)."""

    def advantages(tokens, mask, response_mask, ended, old_logprobs, old_values, ref_logprobs,
                   raw_scores, kl_coef, gain, bias):
        response_mask = response_mask.astype(jnp.float32)
        old_values = old_values * response_mask
        score = ppo.process_scores(raw_scores, ended, gain=gain, bias=bias, clip=hp.reward_clip,
                                   missing_eos_penalty=hp.missing_eos_penalty)
        kl = ppo.per_token_kl(old_logprobs, ref_logprobs, response_mask, hp.kl_estimator)
        rewards = ppo.shaped_rewards(kl, score, response_mask, kl_coef)
        adv, returns = ppo.gae(rewards, old_values, response_mask, gamma=hp.gamma, lam=hp.lam)
        if hp.whiten_advantages:
            adv = ppo.masked_whiten(adv, response_mask)
        experience = Experience(tokens=tokens, mask=mask, response_mask=response_mask,
                                old_logprobs=old_logprobs, old_values=old_values,
                                advantages=adv, returns=returns)
        kl_per_sequence = jnp.sum(kl, axis=-1)
        stats = {
            "score_raw": jnp.mean(raw_scores), "score": jnp.mean(score),
            "kl": jnp.mean(kl_per_sequence),
            "non_score_reward": jnp.mean(jnp.sum(-kl_coef * kl, axis=-1)),
            "returns_mean": ppo.masked_mean(returns, response_mask),
            "values_mean": ppo.masked_mean(old_values, response_mask),
        }
        return experience, stats

    return jax.jit(advantages)


def make_update(model, tx: optax.GradientTransformation, hp: PPOHyper, ptx_loss_fn=None):
    """One PPO gradient step: (state, minibatch Experience, ptx batch) -> (state, stats)."""

    def loss_fn(params, mb: Experience, ptx_batch):
        logits, values = ac.forward(model, params, mb.tokens, mb.mask)
        logprobs, entropy = ac.response_logprobs(logits, mb.tokens, hp.prompt_len, hp.temperature)
        values = ac.response_values(values, hp.prompt_len)
        pg_loss, pg_stats = ppo.policy_loss(logprobs, mb.old_logprobs, mb.advantages,
                                            mb.response_mask, clip_eps=hp.clip_eps)
        vf_loss, vf_clipfrac = ppo.value_loss(values, mb.old_values, mb.returns, mb.response_mask,
                                              clip_eps=hp.value_clip_eps)
        entropy_mean = ppo.masked_mean(entropy, mb.response_mask)
        loss = pg_loss + hp.vf_coef * vf_loss - hp.entropy_coef * entropy_mean
        stats = {"policy_loss": pg_loss, "value_loss": vf_loss, "entropy": entropy_mean,
                 "clip_fraction": pg_stats.clip_fraction, "approx_kl": pg_stats.approx_kl,
                 "ratio_mean": pg_stats.ratio_mean, "value_clip_fraction": vf_clipfrac,
                 "explained_variance": ppo.explained_variance(values, mb.returns,
                                                              mb.response_mask)}
        if ptx_loss_fn is not None and hp.ptx_coef > 0:
            ptx_sum, ptx_weight, _ = ptx_loss_fn(ac.policy_params(params), ptx_batch, None)
            ptx_loss = ptx_sum / jnp.maximum(ptx_weight, 1.0)
            loss = loss + hp.ptx_coef * ptx_loss
            stats["ptx_loss"] = ptx_loss
        return loss, stats

    def update(state: TrainState, mb: Experience, ptx_batch: Any):
        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, mb, ptx_batch)
        grad_norm = optax.global_norm(grads)
        # a non-finite minibatch changes nothing; the stage decides whether to skip or stop
        params, opt_state = divergence.apply_if_finite(
            tx, grads, state.params, state.opt_state, divergence.all_finite(loss, grad_norm))
        stats = dict(stats, loss=loss, grad_norm=grad_norm)
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), stats

    return jax.jit(update, donate_argnums=(0,))


@jax.jit
def take(experience: Experience, index: jax.Array) -> Experience:
    """Rows `index` of every field (a minibatch), spread over the batch mesh axes.

    Args:
        experience: the buffer, every field [B, ...].
        index: int [C] row numbers, the same on every process (host or replicated array).

    Returns:
        Experience with every field [C, ...].
    """
    return jax.tree.map(lambda x: shard_rows(x[index]), experience)


@jax.jit
def rollout_stats(entropy: jax.Array, response_mask: jax.Array, ended: jax.Array
                  ) -> dict[str, jax.Array]:
    """Scalar summaries of a rollout batch, computed on device (no rows leave the mesh).

    Args:
        entropy: float32 [B, N] entropy of each response token's distribution.
        response_mask: int [B, N], 1 on response tokens up to and including EOS.
        ended: bool [B], the row emitted EOS.

    Returns:
        float32 scalars: entropy_rollout (mean over response tokens), response_length (mean
        tokens per row), eos_rate (fraction of rows that ended), response_tokens (total).
    """
    mask = response_mask.astype(jnp.float32)
    tokens = jnp.sum(mask)
    return {"entropy_rollout": jnp.sum(entropy * mask) / jnp.maximum(tokens, 1.0),
            "response_length": jnp.mean(jnp.sum(mask, axis=1)),
            "eos_rate": jnp.mean(ended.astype(jnp.float32)),
            "response_tokens": tokens}
