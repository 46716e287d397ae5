"""Scalar heads on the Transformer trunk: the reward model and the PPO policy's value head.

Letters: B batch, T length, E embed, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from instructjax.model.config import ModelConfig
from instructjax.model.transformer import Transformer


class ScalarHead(nn.Module):
    """Dense E -> 1 per token, computed in float32: hidden [B, T, E] -> [B, T] float32.

    init_std: std of the kernel's normal init; 0 gives a zero kernel (OpenAI zero-initialises
    the policy's value head; the reward head uses N(0, 1/sqrt(E + 1))).
    """

    init_std: float

    @nn.compact
    def __call__(self, hidden_BTE):
        E = hidden_BTE.shape[-1]
        if self.init_std > 0:
            base = nn.initializers.normal(self.init_std)
        else:
            base = nn.initializers.zeros
        kernel_E = self.param("kernel", nn.with_logical_partitioning(base, ("embed",)), (E,),
                              jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                          jnp.float32)
        return jnp.einsum("bte,e->bt", hidden_BTE.astype(jnp.float32), kernel_E) + bias


def reward_head_std(embed_dim: int) -> float:
    """The reward head's init std, 1 / sqrt(E + 1) (Ziegler et al. 2019)."""
    return 1.0 / float(embed_dim + 1) ** 0.5


class RewardModel(nn.Module):
    """Transformer trunk + scalar head: per-token scores [B, T] float32.

    The reward of a sequence is the score at its last real token (`gather_last`). Params:
    {"trunk": Transformer params, "head": {"kernel" [E], "bias" []}}; the trunk's LM head is
    unused (XLA drops the logits it would compute) but kept, so a policy's params load as
    the trunk.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
        hidden_BTE = Transformer(self.cfg, name="trunk").hidden_states(
            tokens_BT, positions_BT, segment_ids_BT)
        return ScalarHead(reward_head_std(self.cfg.embed_dim), name="head")(hidden_BTE)


class PolicyWithValue(nn.Module):
    """One shared trunk with the LM head and a value head: (logits [B,T,V], values [B,T]).

    Params: {"trunk": Transformer params, "value_head": {"kernel", "bias"}}; the value head is
    zero-initialised (OpenAI), so values start at 0.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
        logits_BTV, hidden_BTE = Transformer(self.cfg, name="trunk").logits_and_hidden(
            tokens_BT, positions_BT, segment_ids_BT)
        return logits_BTV, ScalarHead(0.0, name="value_head")(hidden_BTE)


def last_token_index(mask_BT: jax.Array) -> jax.Array:
    """Index of the last nonzero entry of each row of `mask_BT` ([B, T]) -> int32 [B].

    Works for left and right padding alike; an all-zero row gives 0.
    """
    T = mask_BT.shape[-1]
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), mask_BT.shape)
    return jnp.max(jnp.where(mask_BT > 0, positions_BT, 0), axis=-1)


def gather_last(values_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """values at each row's last real token: [B, T], [B, T] -> [B] (dtype of values)."""
    index_B = last_token_index(mask_BT)
    return jnp.take_along_axis(values_BT, index_B[:, None], axis=-1)[:, 0]
