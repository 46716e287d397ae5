"""Loss functions shared by stages, in the `(params, batch, rng) -> (sum, weight, stats)` form."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from instructjax.model.transformer import Transformer


def lm_loss_fn(model: Transformer):
    """Next-token cross-entropy summed over `loss_mask` (float32), plus token accuracy.

    batch: tokens, targets, positions, segment_ids int32 [B, T]; loss_mask float32 [B, T].
    """

    def loss_fn(params, batch, rng):
        del rng  # no dropout in these models
        logits_BTV = model.apply({"params": params}, batch["tokens"],
                                 positions=batch["positions"], segment_ids=batch["segment_ids"])
        nll_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
        mask_BT = batch["loss_mask"].astype(jnp.float32)
        correct_BT = (jnp.argmax(logits_BTV, axis=-1) == batch["targets"]).astype(jnp.float32)
        count = jnp.sum(mask_BT)
        return (jnp.sum(nll_BT * mask_BT), count,
                {"token_accuracy": (jnp.sum(correct_BT * mask_BT), count)})

    return loss_fn
