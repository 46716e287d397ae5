"""The closed-form sizes of parallel/memory_model.py against the models and XLA itself."""

import chex
import jax
import jax.numpy as jnp
import pytest

from configs import models
from instructjax.model.config import ModelConfig, count_params
from instructjax.model.heads import RewardModel
from instructjax.model.transformer import Transformer
from instructjax.parallel import aot
from instructjax.parallel import memory_model as mm


def preset(name, **changes):
    return ModelConfig.from_dict({**models.get(name).to_dict(), **changes})


@pytest.mark.parametrize("name", ["tiny", "1b", "10b"])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_split_adds_up_to_count_params(name, qkv_bias):
    cfg = preset(name, qkv_bias=qkv_bias)
    assert mm.transformer_split(cfg).total == count_params(cfg)
    assert mm.transformer_split(cfg, scalar_heads=1).total == count_params(cfg) + cfg.embed_dim + 1


def test_reward_model_leaves_match_split():
    cfg = preset("tiny", qkv_bias=True)
    abstract = jax.eval_shape(RewardModel(cfg).init, jax.random.key(0),
                              jnp.zeros((1, 8), jnp.int32))["params"]
    assert aot.count_leaves(abstract) == mm.transformer_split(cfg, scalar_heads=1).total


def test_param_bytes_divide_by_the_axes_that_shard_them():
    split = mm.ParamSplit(matrices=6400, vectors=80, biases=40, scalars=1)
    mesh = mm.MeshShape(data=2, fsdp=4, tensor=2)
    # matrices over fsdp x tensor, vectors over fsdp, biases over tensor, scalars whole;
    # the data axis replicates.
    assert mm.param_bytes_per_device(split, mesh, 4) == 4 * (6400 / 8 + 80 / 4 + 40 / 2 + 1)
    assert mm.adam_bytes_per_device(split, mesh) == 2 * mm.param_bytes_per_device(split, mesh, 4)


def test_kv_cache_bytes():
    cfg = preset("10b")
    mesh = mm.MeshShape(data=1, fsdp=8, tensor=8)
    # 2 (k, v) x L x rows/8 x slots x K/8 x D x 2 bytes
    assert mm.kv_cache_bytes_per_device(cfg, 512, 1023, mesh, 2) == 2 * 36 * 64 * 1023 * 1 * 128 * 2


@pytest.mark.parametrize("tie", [True, False])
def test_forward_flops_match_xla_on_a_loop_free_model(tie):
    """XLA's cost_analysis of an unrolled forward agrees with the closed form within 2 %.

    The closed form counts matmuls only; XLA adds norms, RoPE, softmax and SwiGLU
    elementwise work, under 1 % at this width.
    """
    cfg = preset("tiny", embed_dim=256, mlp_dim=768, num_heads=4, num_kv_heads=2, head_dim=64,
                 num_layers=2, scan_layers=False, tie_embeddings=tie)
    model = Transformer(cfg)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    tokens = jax.ShapeDtypeStruct((4, 128), jnp.int32)
    compiled = jax.jit(model.apply).lower(params, tokens).compile()
    xla = compiled.cost_analysis()["flops"]
    closed = mm.forward_flops(cfg, 4, 128)
    chex.assert_trees_all_close(xla / closed, 1.0, atol=0.02)
