"""The training state pytree and its sharded creation."""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from instructjax.parallel import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
    """Everything a supervised step reads and writes.

    step: int32 scalar; params: model pytree; opt_state: optax state;
    rng: uint32[2] raw key data (raw, so that orbax can save it like any other array).
    """
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def state_shardings(init_params_boxed: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                    mesh: Mesh) -> tuple[Any, TrainState]:
    """Abstract TrainState and its NamedShardings, without allocating anything.

    `init_params_boxed(rng)` returns params still wrapped in flax's logical-partitioning
    boxes; their names pick each parameter's sharding through LOGICAL_AXIS_RULES.
    Returns (abstract_state, shardings), both TrainState-shaped.
    """
    boxed = jax.eval_shape(init_params_boxed, jax.random.key(0))
    param_specs = nn.get_partition_spec(boxed)
    params_abstract = nn.meta.unbox(boxed)
    param_shardings = mesh_lib.logical_to_sharding(param_specs, mesh)
    mesh_lib.check_divisible(params_abstract, param_shardings)
    opt_abstract = jax.eval_shape(tx.init, params_abstract)
    opt_shardings = mesh_lib.shardings_like_params(opt_abstract, param_shardings,
                                                   params_abstract, mesh)
    rep = mesh_lib.replicated(mesh)
    abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params_abstract,
                          opt_state=opt_abstract, rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    shardings = TrainState(step=rep, params=param_shardings, opt_state=opt_shardings, rng=rep)
    return abstract, shardings


def create_state(init_params_boxed: Callable[[jax.Array], Any], tx: optax.GradientTransformation,
                 shardings: TrainState, seed: int, params: Any | None = None) -> TrainState:
    """Creates the TrainState directly in its sharded layout (no host-side full copy).

    With `params` given (e.g. loaded from an earlier stage) they are placed on the mesh and
    only the optimiser state is freshly initialised.
    """
    root = jax.random.key(seed)
    init_key, state_key = jax.random.split(root)

    def build(key, given_params):
        p = nn.meta.unbox(init_params_boxed(key)) if given_params is None else given_params
        return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                          rng=jax.random.key_data(state_key))

    if params is None:
        return jax.jit(lambda k: build(k, None), out_shardings=shardings)(init_key)
    params = jax.device_put(params, shardings.params)
    return jax.jit(build, out_shardings=shardings)(init_key, params)
