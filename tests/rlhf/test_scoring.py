"""Reward-model scoring: the K-way ranked pair loss by hand, and the reward read at the last
real token whatever the padding."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

from instructjax.model.config import ModelConfig
from instructjax.model.heads import RewardModel, gather_last, last_token_index
from instructjax.rlhf import scoring


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_k3_loss_equals_hand_computation():
    # responses a, b, c with ranking b > a > c: ranks = [1, 0, 2]
    rewards = jnp.array([[0.5, 2.0, -1.0]])
    ranks = jnp.array([[1, 0, 2]])
    loss_sum, prompts, correct, pairs = scoring.ranked_pair_loss(rewards, ranks)
    # pairs (winner, loser): (b, a), (b, c), (a, c); all three are ordered correctly
    expected = -(log_sigmoid(2.0 - 0.5) + log_sigmoid(2.0 + 1.0) + log_sigmoid(0.5 + 1.0)) / 3
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-6)
    assert float(prompts) == 1 and float(pairs) == 3 and float(correct) == 3


def test_pair_loss_handles_missing_responses_and_empty_prompts():
    rewards = jnp.array([[1.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    ranks = jnp.array([[0, 1, -1], [-1, -1, -1]])  # prompt 0: K=2 padded to 3; prompt 1: none
    loss_sum, prompts, correct, pairs = scoring.ranked_pair_loss(rewards, ranks)
    np.testing.assert_allclose(float(loss_sum), -log_sigmoid(1.0), rtol=1e-6)
    assert float(prompts) == 1 and float(pairs) == 1 and float(correct) == 1
    # a misordered pair counts as incorrect
    _, _, correct, _ = scoring.ranked_pair_loss(jnp.array([[0.0, 1.0]]), jnp.array([[0, 1]]))
    assert float(correct) == 0


def test_last_token_index_left_and_right_padding():
    mask = jnp.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    chex.assert_trees_all_equal(last_token_index(mask), jnp.array([2, 4, 2], jnp.int32))
    values = jnp.arange(15.0).reshape(3, 5)
    chex.assert_trees_all_close(gather_last(values, mask), jnp.array([2.0, 9.0, 12.0]))


def test_reward_independent_of_padding_side_and_amount():
    cfg = ModelConfig(vocab_size=32, embed_dim=16, num_layers=2, num_heads=2, num_kv_heads=1,
                      head_dim=8, mlp_dim=32, max_seq_len=16)
    rm = RewardModel(cfg)
    params = rm.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    seq = [2, 7, 9, 11, 3]
    rows, masks = [], []
    for left, right in [(0, 7), (3, 4), (7, 0), (1, 2)]:
        width = left + len(seq) + right
        rows.append([0] * left + seq + [0] * right + [0] * (12 - width))
        masks.append([0] * left + [1] * len(seq) + [0] * (12 - left - len(seq)))
    rewards = scoring.score_sequences(rm, params, jnp.array(rows), jnp.array(masks))
    chex.assert_shape(rewards, (4,))
    assert rewards.dtype == jnp.float32
    # float32; padding never enters attention, so only summation order differs
    np.testing.assert_allclose(np.asarray(rewards), float(rewards[0]), rtol=1e-5, atol=1e-6)
    # ... and a different last token changes the reward (the read position matters)
    other = scoring.score_sequences(rm, params, jnp.array([seq[:-1] + [5] + [0] * 7]),
                                    jnp.array([[1] * 5 + [0] * 7]))
    assert abs(float(other[0]) - float(rewards[0])) > 1e-6
