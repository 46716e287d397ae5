"""Jitted, sharded supervised train and eval steps built around a stage's loss function.

A stage supplies `loss_fn(params, batch, rng) -> (loss_sum, weight, stats)`:
  loss_sum -- float32 scalar, the SUM of per-token (or per-pair) losses in the batch,
  weight   -- float32 scalar, how many tokens (pairs) that sum covers,
  stats    -- dict name -> (numerator, denominator) of extra metrics (e.g. accuracy).
The step divides sums by counts only after summing over micro-batches and devices, so
gradient accumulation and sharding give exactly the full-batch mean (PPO-DETAILS: token-sum
/ token-count).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from instructjax.parallel import mesh as mesh_lib
from instructjax.train import divergence
from instructjax.train.state import TrainState

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, jax.Array, dict]]


def split_micro_batches(batch: dict, num_micro: int) -> dict:
    """[B, ...] -> [num_micro, B / num_micro, ...], micro-batch a taking rows a, a+A, a+2A, ...

    Interleaving keeps every micro-batch spread over all batch shards (each device's
    contiguous rows contain rows of every micro-batch), so no data moves between devices.
    """
    def split(x):
        b = x.shape[0]
        y = x.reshape((b // num_micro, num_micro) + x.shape[1:])
        return jnp.swapaxes(y, 0, 1)
    return jax.tree.map(split, batch)


def _accumulate(loss_fn: LossFn, params: Any, batch: dict, rng: jax.Array, num_micro: int):
    """Summed gradients of loss_sum, loss_sum, weight and stats over `num_micro` micro-batches."""

    def one(p, b, r):
        def split_aux(q):
            loss_sum, weight, stats = loss_fn(q, b, r)
            return loss_sum, (weight, stats)
        (loss_sum, (weight, stats)), grads = jax.value_and_grad(split_aux, has_aux=True)(p)
        return grads, loss_sum, weight, stats

    if num_micro == 1:
        return one(params, batch, rng)

    micro = split_micro_batches(batch, num_micro)
    keys = jax.random.split(rng, num_micro)

    def body(carry, xs):
        b, r = xs
        grads, loss_sum, weight, stats = one(params, b, r)
        carry = jax.tree.map(jnp.add, carry, (grads, loss_sum, weight, stats))
        return carry, None

    first = jax.eval_shape(one, params, jax.tree.map(lambda x: x[0], micro), keys[0])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32 if jnp.issubdtype(
        s.dtype, jnp.floating) else s.dtype), first)
    total, _ = jax.lax.scan(body, zeros, (micro, keys))
    return total


def _finish_stats(stats: dict) -> dict:
    return {name: num / jnp.maximum(den, 1e-9) for name, (num, den) in stats.items()}


def optimizer_count(opt_state: Any, fallback: jax.Array) -> jax.Array:
    """The optimiser's own update count (the step its schedule is at), int32 [].

    It differs from `TrainState.step` after skipped non-finite steps, which leave the
    optimiser state, its count included, untouched. `fallback` when the state has none.
    """
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return found[0][1] if found else fallback


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum_steps: int = 1):
    """Returns the pure `train_step(state, batch) -> (state, metrics)` (not yet jitted)."""

    def train_step(state: TrainState, batch: dict):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        grads_sum, loss_sum, weight, stats = _accumulate(loss_fn, state.params, batch, rng,
                                                         grad_accum_steps)
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads_sum)
        loss, grad_norm = loss_sum / denom, optax.global_norm(grads)
        finite = divergence.all_finite(loss, grad_norm)
        # a non-finite step changes nothing; the loop decides whether to skip it or stop
        params, opt_state = divergence.apply_if_finite(tx, grads, state.params,
                                                       state.opt_state, finite)
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(schedule(optimizer_count(state.opt_state, state.step)),
                              jnp.float32),
            "weight": weight,
            **_finish_stats(stats),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(loss_fn: LossFn):
    """Returns `eval_step(params, batch) -> dict name -> (numerator, denominator)` sums."""

    def eval_step(params: Any, batch: dict):
        loss_sum, weight, stats = loss_fn(params, batch, jax.random.key(0))
        return {"loss": (loss_sum, weight), **stats}

    return eval_step


def jit_train_step(train_step, state_shardings: TrainState, mesh: Mesh, batch_ndims: dict):
    """Jits once with explicit in/out shardings; the input state is donated."""
    batch_shardings = {k: mesh_lib.batch_sharding(mesh, nd) for k, nd in batch_ndims.items()}
    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, mesh_lib.replicated(mesh)),
                   donate_argnums=(0,))


def jit_eval_step(eval_step, param_shardings: Any, mesh: Mesh, batch_ndims: dict):
    """Jits the eval step with the params' shardings and a replicated result."""
    batch_shardings = {k: mesh_lib.batch_sharding(mesh, nd) for k, nd in batch_ndims.items()}
    return jax.jit(eval_step, in_shardings=(param_shardings, batch_shardings),
                   out_shardings=mesh_lib.replicated(mesh))
