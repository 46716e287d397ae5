"""KL-penalty coefficient controllers (Ziegler et al. 2019, section 2.2), as a tiny pytree."""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp

CONTROLLERS = ("fixed", "adaptive")


@dataclasses.dataclass(frozen=True)
class KLControllerConfig:
    """kind: fixed | adaptive; init_coef: beta_0; target: KL target (nats per sequence);
    horizon: episodes over which the proportional controller closes the gap."""
    kind: str = "adaptive"
    init_coef: float = 0.15
    target: float = 6.0
    horizon: float = 10_000.0

    def __post_init__(self):
        if self.kind not in CONTROLLERS:
            raise ValueError(f"kl controller {self.kind!r}; valid: {CONTROLLERS}")


@flax.struct.dataclass
class KLControllerState:
    """The current coefficient beta (float32 scalar)."""
    kl_coef: jax.Array


def init_controller(cfg: KLControllerConfig) -> KLControllerState:
    """beta = init_coef."""
    return KLControllerState(kl_coef=jnp.asarray(cfg.init_coef, jnp.float32))


def update_controller(cfg: KLControllerConfig, state: KLControllerState, current_kl: jax.Array,
                      num_episodes: int) -> KLControllerState:
    """One controller step after a batch of `num_episodes` sequences with mean KL `current_kl`.

    adaptive: e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon).
    fixed: beta unchanged. `current_kl` is the mean per-sequence KL of policy vs reference.
    """
    if cfg.kind == "fixed":
        return state
    error = jnp.clip(current_kl / cfg.target - 1.0, -0.2, 0.2)
    return KLControllerState(kl_coef=state.kl_coef * (1.0 + error * num_episodes / cfg.horizon))
