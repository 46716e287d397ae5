"""A separate critic starts as the reward model rescaled to normalised-score units."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instructjax.model.config import ModelConfig
from instructjax.model.heads import RewardModel
from instructjax.rlhf import actor_critic as ac

CFG = ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=48, max_seq_len=32)


def test_critic_values_are_the_normalised_reward_scores():
    rm = RewardModel(CFG)
    tokens = jax.random.randint(jax.random.key(1), (3, 12), 4, 61)
    rm_params = nn.meta.unbox(rm.init(jax.random.key(0), tokens)["params"])
    rm_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), rm_params)  # frozen dtype
    gain, bias = 1 / 3.35, -1.41 / 3.35
    critic = ac.critic_from_reward_model(rm_params, gain, bias)
    chex.assert_trees_all_equal_shapes(critic, rm_params)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(critic))
    raw = rm.apply({"params": jax.tree.map(lambda x: x.astype(jnp.float32), rm_params)}, tokens)
    values = rm.apply({"params": critic}, tokens)
    np.testing.assert_allclose(values, gain * raw + bias, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(critic["trunk"], jax.tree.map(
        lambda x: x.astype(jnp.float32), rm_params["trunk"]))
