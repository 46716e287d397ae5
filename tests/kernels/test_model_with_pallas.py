"""The model trained with attention_impl="pallas" (interpret mode on CPU) follows the same
loss curve as with the plain-jnp "xla" attention for a few optimiser steps."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instructjax.model.config import ModelConfig
from instructjax.model.transformer import Transformer, init_boxed_params
from instructjax.train import optim, step as step_lib
from instructjax.train.losses import lm_loss_fn
from instructjax.train.state import TrainState


def test_pallas_and_xla_training_agree():
    base = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=8, mlp_dim=64, max_seq_len=40)
    rng = np.random.default_rng(0)
    B, T = 2, 40
    tokens = rng.integers(0, 64, size=(B, T + 1)).astype(np.int32)
    segments = np.where(np.arange(T) < 23, 1, 2).astype(np.int32)[None].repeat(B, 0)
    segments[1, 35:] = 0  # padding at the end of row 1
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
             "positions": np.where(segments == 2, np.arange(T) - 23, np.arange(T)).astype(np.int32),
             "loss_mask": (segments > 0).astype(np.float32)}
    opt = optim.OptimConfig(learning_rate=1e-2, total_steps=10, warmup_steps=0)
    tx = optim.make_optimizer(opt)
    params = nn.meta.unbox(init_boxed_params(Transformer(base), jax.random.key(0)))

    losses = {}
    for impl in ("xla", "pallas"):
        model = Transformer(dataclasses.replace(base, attention_impl=impl))
        step = jax.jit(step_lib.make_train_step(lm_loss_fn(model), tx, optim.make_schedule(opt)))
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                           rng=jax.random.key_data(jax.random.key(1)))
        trajectory = []
        for _ in range(4):
            state, metrics = step(state, batch)
            trajectory.append(float(metrics["loss"]))
        losses[impl] = trajectory
    # float32; the kernels reorder the softmax sums (online softmax), ~1e-6 per step
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)
    assert losses["xla"][-1] < losses["xla"][0]
