"""AdamW's weight-decay mask: decided by parameter name, not rank (scanned and unrolled)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from instructjax.model.config import ModelConfig
from instructjax.model.heads import RewardModel
from instructjax.model.transformer import Transformer
from instructjax.train import optim


def _params(module):
    return nn.meta.unbox(module.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


@pytest.mark.parametrize("scan_layers", [True, False])
def test_norm_scales_and_biases_are_not_decayed_in_any_layout(scan_layers):
    cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, mlp_dim=64, max_seq_len=16, qkv_bias=True,
                      tie_embeddings=False, scan_layers=scan_layers)
    params = _params(RewardModel(cfg))
    mask = flatten_dict(optim.decay_mask(params))
    shapes = {k: v.shape for k, v in flatten_dict(params).items()}
    for path, decayed in mask.items():
        name = path[-1]
        assert decayed == (name not in ("scale", "bias")), ("/".join(path), shapes[path])
    # the cases that a rank rule gets wrong are present in this tree
    assert any(p[-1] == "bias" and len(shapes[p]) >= 2 for p in mask)      # qkv bias [H, D]
    if scan_layers:
        assert any(p[-1] == "scale" and len(shapes[p]) == 2 for p in mask)  # norm [L, E]
    assert mask[("head", "kernel")]          # scalar head kernel [E]: a weight, decayed
    assert not mask[("head", "bias")]


def test_adamw_update_of_undecayed_leaves_matches_zero_decay():
    """With zero gradients AdamW's update is pure decay: norms and biases must not move."""
    cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, mlp_dim=64, max_seq_len=16, qkv_bias=True, scan_layers=True)
    params = _params(Transformer(cfg))
    params = jax.tree.map(lambda p: p + 0.5, params)  # biases start at 0: make decay visible
    tx = optim.make_optimizer(optim.OptimConfig(learning_rate=0.1, total_steps=10,
                                                weight_decay=0.5, grad_clip=0.0))
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, update in flatten_dict(updates).items():
        if path[-1] in ("scale", "bias"):
            np.testing.assert_array_equal(np.asarray(update), 0.0, err_msg="/".join(path))
        else:  # decoupled decay: -lr * wd * p
            original = flatten_dict(params)[path]
            np.testing.assert_allclose(np.asarray(update), -0.1 * 0.5 * np.asarray(original),
                                       rtol=1e-6, err_msg="/".join(path))
