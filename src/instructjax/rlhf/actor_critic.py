"""The PPO model: policy logits and per-token values, from one shared trunk or two models.

Letters: B batch, S sequence (prompt P + response N), V vocab.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from instructjax.model.config import ModelConfig
from instructjax.model.heads import PolicyWithValue, RewardModel
from instructjax.model.transformer import Transformer
from instructjax.rlhf.scoring import positions_from_mask

CRITICS = ("shared", "separate")


class SeparateActorCritic(nn.Module):
    """Policy Transformer ("actor") and a critic with the reward model's architecture ("critic").

    The critic is initialised from the reward model (TRL / TL;DR follow-up); its per-token
    scores are the values.
    """

    actor_cfg: ModelConfig
    critic_cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BS, positions_BS=None, segment_ids_BS=None):
        logits_BSV = Transformer(self.actor_cfg, name="actor")(tokens_BS, positions_BS, segment_ids_BS)
        values_BS = RewardModel(self.critic_cfg, name="critic")(tokens_BS, positions_BS, segment_ids_BS)
        return logits_BSV, values_BS


def make_actor_critic(critic: str, policy_cfg: ModelConfig, critic_cfg: ModelConfig | None = None):
    """PolicyWithValue (critic="shared") or SeparateActorCritic (critic="separate")."""
    if critic == "shared":
        return PolicyWithValue(policy_cfg)
    if critic == "separate":
        return SeparateActorCritic(policy_cfg, critic_cfg or policy_cfg)
    raise ValueError(f"ppo.critic={critic!r}; valid: {CRITICS}")


def critic_from_reward_model(rm_params, gain: float, bias: float):
    """Reward-model params rescaled so the critic starts out predicting normalised scores.

    PPO's returns are in normalised-score units (gain * raw + bias, `ppo.shaped_rewards`),
    while the reward head outputs raw scores: scaling the head's kernel and bias by `gain` and
    adding `bias` makes the initial values the normalised score the RM would give each prefix
    (DeepSpeed-Chat and OpenRLHF initialise the critic from the RM for this reason). The result
    is float32 (the critic is trained).
    """
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), rm_params)
    head = params["head"]
    return {**params, "head": {"kernel": head["kernel"] * gain,
                               "bias": head["bias"] * gain + bias}}


def policy_params(params):
    """The Transformer params of the policy inside either actor-critic param tree."""
    return params["trunk"] if "trunk" in params else params["actor"]


def forward(model, params, tokens_BS: jax.Array, mask_BS: jax.Array):
    """(logits [B, S, V] float32, values [B, S] float32) over masked (left-padded) rows.

    tokens_BS: int32 [B, S], left-padded prompt then response (Rollout.tokens); mask_BS: int
    [B, S], 1 on real tokens (Rollout.mask). Pad tokens are segment 0 of the attention mask,
    so no token sees them, and positions are cumsum(mask) - 1: the same attention and
    positions as rollout.generate's cached decoding, so the response log-probs
    (`response_logprobs`) match the sampler's.
    """
    mask_BS = mask_BS.astype(jnp.int32)
    return model.apply({"params": params}, tokens_BS, positions_from_mask(mask_BS), mask_BS)


def response_logprobs(logits_BSV: jax.Array, tokens_BS: jax.Array, prompt_len: int,
                      temperature: float) -> tuple[jax.Array, jax.Array]:
    """Log-probs and entropies of the response tokens under softmax(logits / temperature).

    The logits at position t predict token t + 1, so positions P-1 .. S-2 score the response
    tokens P .. S-1. Returns (logprobs [B, N], entropy [B, N]), float32. Using the sampling
    temperature here keeps PPO's ratios and KL consistent with how responses were drawn.
    """
    logits = logits_BSV[:, prompt_len - 1:-1].astype(jnp.float32) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logprobs = jnp.take_along_axis(logp_all, tokens_BS[:, prompt_len:, None], axis=-1)[..., 0]
    entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
    return logprobs, entropy


def response_values(values_BS: jax.Array, prompt_len: int) -> jax.Array:
    """The value of the state before each response token: values at P-1 .. S-2 -> [B, N]."""
    return values_BS[:, prompt_len - 1:-1]
