"""Reward-model scores of whole sequences, and the comparison (Bradley-Terry) loss.

Letters: B batch, K responses per prompt, T length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instructjax.model.heads import RewardModel, gather_last


def positions_from_mask(mask_BT: jax.Array) -> jax.Array:
    """Position of each token counting real tokens only: cumsum(mask) - 1, clipped at 0.

    Left-padded prompts then start at position 0 like unpadded ones (PPO-DETAILS).
    """
    return jnp.maximum(jnp.cumsum(mask_BT.astype(jnp.int32), axis=-1) - 1, 0)


def score_sequences(model: RewardModel, params, tokens_BT: jax.Array, mask_BT: jax.Array
                    ) -> jax.Array:
    """Reward of each sequence, read at its last real token: -> float32 [B].

    tokens_BT int32 and mask_BT {0,1} [B, T]; padding on either side (mask 0) is excluded
    from attention by using the mask as segment ids.
    """
    mask_BT = mask_BT.astype(jnp.int32)
    scores_BT = model.apply({"params": params}, tokens_BT, positions_from_mask(mask_BT), mask_BT)
    return gather_last(scores_BT, mask_BT)


def ranked_pair_loss(rewards_BK: jax.Array, ranks_BK: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """InstructGPT's reward-model loss over all ranked pairs of each prompt.

    For prompt b with K_b ranked responses: loss_b = -1/C(K_b, 2) * sum over pairs (w, l),
    w ranked better, of log sigmoid(r_w - r_l) (Ouyang et al. 2022, eq. 1).

    Args:
        rewards_BK: float32 [B, K] rewards.
        ranks_BK: int32 [B, K], 0 = best, -1 = missing response (no pairs).

    Returns:
        (sum over prompts of loss_b, number of prompts with a pair, correctly ordered pairs,
        number of pairs) -- float32 scalars, so callers reduce as sum / count.
    """
    valid_BK = ranks_BK >= 0
    better_BKK = ((ranks_BK[:, :, None] < ranks_BK[:, None, :])
                  & valid_BK[:, :, None] & valid_BK[:, None, :]).astype(jnp.float32)
    diff_BKK = rewards_BK[:, :, None] - rewards_BK[:, None, :]
    pairs_B = jnp.sum(better_BKK, axis=(1, 2))
    loss_B = -jnp.sum(jax.nn.log_sigmoid(diff_BKK) * better_BKK, axis=(1, 2)) / jnp.maximum(pairs_B, 1.0)
    has_pairs_B = (pairs_B > 0).astype(jnp.float32)
    correct = jnp.sum((diff_BKK > 0).astype(jnp.float32) * better_BKK)
    return jnp.sum(loss_B * has_pairs_B), jnp.sum(has_pairs_B), correct, jnp.sum(pairs_B)
