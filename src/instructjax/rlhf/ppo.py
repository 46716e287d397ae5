"""PPO for language models as pure, jittable functions on masked [B, N] arrays.

Letters: B sequences, N response tokens. `mask_BN` is 1 on response tokens up to
and including the first EOS, 0 after (a prefix of ones per row).
Formulas follow OpenAI's lm-human-preferences (Ziegler et al. 2019) and the InstructGPT
paper (Ouyang et al. 2022); ../shared/PPO-DETAILS.md lists them with their sources.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k3")


# ------------------------------------------------------------------------------ masked stats

def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    """sum(x * mask) in float32."""
    return jnp.sum(x.astype(jnp.float32) * mask.astype(jnp.float32))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of x over mask == 1 (0 when the mask is empty)."""
    return masked_sum(x, mask) / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Population variance over mask == 1 (OpenAI's choice; no Bessel correction)."""
    mean = masked_mean(x, mask)
    return masked_mean(jnp.square(x - mean), mask)


def masked_whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over masked entries; with shift_mean=False the mean is kept.

    Entries outside the mask are returned as 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask > 0, whitened, 0.0)


# ------------------------------------------------------------------------------ rewards

def per_token_kl(logprobs_BN: jax.Array, ref_logprobs_BN: jax.Array, mask_BN: jax.Array,
                 estimator: str = "k1") -> jax.Array:
    """Per-token estimate of KL(pi || pi_ref) at the sampled tokens -> float32 [B, N].

    k1 = log pi - log pi_ref (unbiased, can be negative per token);
    k3 = exp(-d) - 1 + d with d = log pi - log pi_ref (non-negative, lower variance);
    d is clamped to +-20 inside k3 so exp cannot overflow. Zero outside the mask.
    """
    delta = (logprobs_BN - ref_logprobs_BN).astype(jnp.float32)
    if estimator == "k1":
        kl = delta
    elif estimator == "k3":
        d = jnp.clip(delta, -20.0, 20.0)
        kl = jnp.exp(-d) - 1.0 + d
    else:
        raise ValueError(f"kl estimator {estimator!r}; valid: {KL_ESTIMATORS}")
    return jnp.where(mask_BN > 0, kl, 0.0)


def process_scores(raw_B: jax.Array, ended_B: jax.Array, *, gain: float, bias: float,
                   clip: float = 0.0, missing_eos_penalty: float | None = None) -> jax.Array:
    """Reward-model scores -> the scalar reward of each sequence, float32 [B].

    score = gain * raw + bias (gain/bias fixed from the SFT policy's samples so the score
    has mean 0, std 1 there); responses that never emitted EOS get `missing_eos_penalty`
    instead when it is given (OpenAI / TL;DR use -1); then clipped to +-clip when clip > 0.
    """
    score = gain * raw_B.astype(jnp.float32) + bias
    if missing_eos_penalty is not None:
        score = jnp.where(ended_B, score, jnp.float32(missing_eos_penalty))
    if clip > 0:
        score = jnp.clip(score, -clip, clip)
    return score


def last_index(mask_BN: jax.Array) -> jax.Array:
    """Index of the last response token of each row -> int32 [B] (0 for an empty row)."""
    return jnp.maximum(jnp.sum(mask_BN.astype(jnp.int32), axis=-1) - 1, 0)


def shaped_rewards(kl_BN: jax.Array, score_B: jax.Array, mask_BN: jax.Array,
                   kl_coef: jax.Array) -> jax.Array:
    """r_t = -beta * kl_t, plus the sequence score at the last response token -> [B, N]."""
    N = mask_BN.shape[-1]
    at_end_BN = jax.nn.one_hot(last_index(mask_BN), N, dtype=jnp.float32)
    has_tokens_B = (jnp.sum(mask_BN, axis=-1) > 0).astype(jnp.float32)
    rewards = -kl_coef * kl_BN + at_end_BN * (score_B * has_tokens_B)[:, None]
    return jnp.where(mask_BN > 0, rewards, 0.0)


# ------------------------------------------------------------------------------ advantages

def gae(rewards_BN: jax.Array, values_BN: jax.Array, mask_BN: jax.Array, *,
        gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the response (Schulman et al. 2016, eq. 16).

    delta_t = r_t + gamma * V_{t+1} - V_t with V = 0 after the last response token;
    A_t = delta_t + gamma * lam * A_{t+1}. Computed by a reverse `lax.scan` over N.
    Returns (advantages, returns = advantages + values), float32 [B, N], 0 outside the mask.
    """
    mask = mask_BN.astype(jnp.float32)
    values = values_BN.astype(jnp.float32) * mask
    rewards = rewards_BN.astype(jnp.float32) * mask
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    next_mask = jnp.concatenate([mask[:, 1:], jnp.zeros_like(mask[:, :1])], axis=1)
    deltas = rewards + gamma * next_values * next_mask - values

    def step(carry_B, xs):
        delta_B, next_mask_B = xs
        adv_B = delta_B + gamma * lam * carry_B * next_mask_B
        return adv_B, adv_B

    _, adv_NB = jax.lax.scan(step, jnp.zeros_like(deltas[:, 0]), (deltas.T, next_mask.T),
                             reverse=True)
    advantages = adv_NB.T * mask
    return advantages, (advantages + values) * mask


# ------------------------------------------------------------------------------ losses

class PolicyLossStats(NamedTuple):
    """Diagnostics of the clipped policy objective (masked means, float32 scalars)."""
    clip_fraction: jax.Array
    approx_kl: jax.Array
    ratio_mean: jax.Array


def policy_loss(logprobs_BN: jax.Array, old_logprobs_BN: jax.Array, advantages_BN: jax.Array,
                mask_BN: jax.Array, *, clip_eps: float, num_tokens: jax.Array | None = None
                ) -> tuple[jax.Array, PolicyLossStats]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise.

    L = sum_t max(-A_t * rho_t, -A_t * clip(rho_t, 1-eps, 1+eps)) / num_tokens with
    rho_t = exp(log pi - log pi_old). `num_tokens` defaults to the mask's count; pass the
    whole minibatch's count when summing micro-batches so the sum is exact.
    """
    num_tokens = jnp.sum(mask_BN.astype(jnp.float32)) if num_tokens is None else num_tokens
    log_ratio = (logprobs_BN - old_logprobs_BN).astype(jnp.float32)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages_BN * ratio
    clipped = -advantages_BN * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_sum(jnp.maximum(unclipped, clipped), mask_BN) / jnp.maximum(num_tokens, 1.0)
    stats = PolicyLossStats(
        clip_fraction=masked_mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32), mask_BN),
        approx_kl=masked_mean(0.5 * jnp.square(log_ratio), mask_BN),  # OpenAI's estimate
        ratio_mean=masked_mean(ratio, mask_BN))
    return loss, stats


def value_loss(values_BN: jax.Array, old_values_BN: jax.Array, returns_BN: jax.Array,
               mask_BN: jax.Array, *, clip_eps: float, num_tokens: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Clipped value loss: 1/2 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2), masked mean.

    Returns (loss, fraction of tokens where the clipped term was larger).
    """
    num_tokens = jnp.sum(mask_BN.astype(jnp.float32)) if num_tokens is None else num_tokens
    values = values_BN.astype(jnp.float32)
    clipped = old_values_BN + jnp.clip(values - old_values_BN, -clip_eps, clip_eps)
    loss_unclipped = jnp.square(values - returns_BN)
    loss_clipped = jnp.square(clipped - returns_BN)
    loss = 0.5 * masked_sum(jnp.maximum(loss_unclipped, loss_clipped), mask_BN) / jnp.maximum(
        num_tokens, 1.0)
    return loss, masked_mean((loss_clipped > loss_unclipped).astype(jnp.float32), mask_BN)


def explained_variance(values_BN: jax.Array, returns_BN: jax.Array, mask_BN: jax.Array
                       ) -> jax.Array:
    """1 - Var[R - V] / Var[R] over the mask (1 = perfect critic, <= 0 = useless)."""
    var_returns = masked_var(returns_BN, mask_BN)
    return 1.0 - masked_var(returns_BN - values_BN, mask_BN) / jnp.maximum(var_returns, 1e-8)
