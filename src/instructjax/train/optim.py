"""Optimiser from config: AdamW with warmup + cosine/linear decay and global-norm clipping."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Optimiser hyperparameters (converted once from `config.train` by stages/settings.py)."""
    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    decay: str = "cosine"            # cosine | linear | constant
    min_lr_ratio: float = 0.1        # final lr = learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0           # global-norm clip; <= 0 disables


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then decay to `learning_rate * min_lr_ratio`."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif cfg.decay == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(f"train.decay={cfg.decay!r}; valid: 'cosine', 'linear', 'constant'")
    if cfg.warmup_steps <= 0:
        return after
    warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
    return optax.join_schedules([warmup, after], [cfg.warmup_steps])


# Leaf names that are never decayed: RMSNorm scales and biases (GPT/LLaMA/HF Trainer practice).
# Decided by name, not rank: with nn.scan a norm scale is [L, E] and a qkv bias is [H, D].
NO_DECAY_LEAVES = ("scale", "bias")


def decay_mask(params: Any) -> Any:
    """A pytree of bools like `params`: True for the leaves AdamW decays.

    Every leaf is decayed (matrices, embeddings, scalar-head kernels) except those whose last
    path component is in NO_DECAY_LEAVES, whatever their rank or the layer layout.
    """
    def decays(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", last))
        return str(name) not in NO_DECAY_LEAVES
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """AdamW (optax places eps like PyTorch) preceded by global-norm clipping."""
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
