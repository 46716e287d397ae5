"""The reward model's score statistics over a policy's samples, for PPO's normalisation.

PPO feeds the policy's reward as (score - mean) / std, with mean and std of the reward
model's score over answers the starting (SFT) policy samples on training prompts
(Ziegler et al. 2019 normalise the same way). The reward stage computes them once when it
finishes; PPO computes them itself for a reward model it did not train (an imported one).
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from instructjax.rlhf import rollout, scoring


def score_statistics(policy, policy_params, rm, rm_params, tokens, mask, *, sampling,
                     eos_ids, pad_id: int, batch_size: int, seed: int) -> dict:
    """Mean / std of the reward model's score over one sampled answer per prompt.

    Args:
        policy: a Transformer (static); policy_params its params.
        rm: a RewardModel (static); rm_params its params.
        tokens, mask: left-padded prompts int32 [N, P] and their mask.
        sampling: rollout.SamplingConfig of the answers (one per prompt is drawn).
        eos_ids: the tokenizer's end ids; pad_id its pad id.
        batch_size: prompts per generate call.
        seed: draws use keys split from key(seed + 17).

    Returns:
        {"mean", "std", "num_samples", "temperature"} (floats / int).
    """
    score = jax.jit(functools.partial(scoring.score_sequences, rm))
    rewards, rng = [], jax.random.key(seed + 17)
    for start in range(0, len(tokens), batch_size):
        rng, key = jax.random.split(rng)
        out = rollout.generate(policy, policy_params, tokens[start:start + batch_size],
                               mask[start:start + batch_size], key,
                               **sampling.options(greedy=False, num_samples=1, eos_id=eos_ids,
                                                  pad_id=pad_id))
        rewards.append(np.asarray(jax.device_get(score(rm_params, out.tokens, out.mask))))
    rewards = np.concatenate(rewards)
    return {"mean": float(rewards.mean()), "std": float(rewards.std()),
            "num_samples": len(rewards), "temperature": sampling.temperature}
