"""`--config.dry_run=True`: compile a stage's programs for the declared mesh and check they fit.

Nothing is trained and no parameter is allocated. The run
  1. asks for `hardware.num_devices` virtual CPU devices when the real ones are absent
     (before jax starts its backends) and builds `config.mesh` over them;
  2. builds every model's state with `jax.eval_shape` and places it, as sharded
     ShapeDtypeStructs, with the same sharding code the stages use;
  3. lowers and compiles the stage's programs (PPO: rollout, policy / reference / reward
     forwards, PPO update; pretrain / SFT / reward: the train step) and reads
     `memory_analysis()` (per-device bytes) of each;
  4. counts FLOPs with `cost_analysis()` on loop-free "cost twins" of the programs (layers
     unrolled at 1 and 2 layers, one forward chunk, one decode step) extrapolated linearly to
     L layers, because XLA counts a loop body (the scanned layers) once;
  5. prints a table and writes WORKDIR/dry_run.json with the closed-form estimates of
     parallel/memory_model.py beside the measured numbers;
  6. raises StageError naming the first program whose per-device footprint plus the resident
     buffers it does not take as arguments exceeds `hardware.memory_per_device_gb`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from instructjax.data.tokenizer import EOS_ID, PAD_ID
from instructjax.model import cache as cache_lib
from instructjax.model.config import ModelConfig, count_params
from instructjax.model.heads import RewardModel
from instructjax.model.transformer import Transformer, init_boxed_params
from instructjax.parallel import aot
from instructjax.parallel import memory_model as mm
from instructjax.parallel import mesh as mesh_lib
from instructjax.stages import common, dry_run_report, settings, workdirs

DRY_RUN_FILE = "dry_run.json"
SUPPORTED = ("pretrain", "sft", "reward", "ppo")
DEFAULT_NUM_RESPONSES = 4  # reward stage with reward.num_responses = 0 (K from the data)


@dataclasses.dataclass(frozen=True)
class Program:
    """One program to compile.

    name: what the table calls it; fn: a jitted or plain function; args: sharded
    ShapeDtypeStructs; calls: how often it runs per step (PPO: per iteration); holds: the
    resident buffers among its arguments; closed_form_argument_bytes: the estimate of its
    per-device argument bytes. A cost twin carries the name of the program it stands for.
    """
    name: str
    fn: Callable
    args: tuple
    calls: int = 1
    holds: tuple[str, ...] = ()
    closed_form_argument_bytes: float = 0.0


@dataclasses.dataclass
class Plan:
    """A stage's models, resident buffers and programs at one model config.

    params: scalar parameters per model (counted from the abstract trees);
    resident: buffers alive for the whole step, name -> per-device bytes (from shardings);
    closed_form: the same buffers (and the KV cache) from memory_model;
    closed_form_flops: per-device FLOPs per step of each program, from memory_model;
    programs: what to compile.
    """
    params: dict[str, int]
    resident: dict[str, int]
    closed_form: dict[str, float]
    closed_form_flops: dict[str, float]
    programs: list[Program]


# ----------------------------------------------------------------------------- helpers

def mesh_shape(mesh: Mesh) -> mm.MeshShape:
    """The MeshShape of a built mesh."""
    return mm.MeshShape(**{axis: int(mesh.shape[axis]) for axis in mesh_lib.MESH_AXES})


def _batch(shape: tuple[int, ...], dtype, mesh: Mesh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype),
                                sharding=mesh_lib.batch_sharding(mesh, len(shape)))


def _params(module: nn.Module, mesh: Mesh) -> Any:
    """Sharded abstract params of `module` (a model taking tokens [B, T])."""
    abstract, shardings = workdirs.logical_shardings(
        lambda rng: init_boxed_params(module, rng), mesh)
    return aot.with_shardings(abstract, shardings)


def _state(init_boxed: Callable, tx, mesh: Mesh) -> Any:
    """Sharded abstract TrainState of `init_boxed` under optimiser `tx`."""
    from instructjax.train import state as state_lib
    abstract, shardings = state_lib.state_shardings(init_boxed, tx, mesh)
    return aot.with_shardings(abstract, shardings)


def _lm_batch(rows: int, length: int, mesh: Mesh) -> dict:
    from instructjax.data.packing import BATCH_KEYS
    return {k: _batch((rows, length), jnp.float32 if k == "loss_mask" else jnp.int32, mesh)
            for k in BATCH_KEYS}


def model_config(model: dict) -> ModelConfig:
    """The ModelConfig of config.model (the dry run has no earlier stage to read it from)."""
    try:
        return ModelConfig.from_dict(model)
    except ValueError as err:
        raise common.StageError(f"config.model: {err}") from err


def compiled_model_config(cfg: ModelConfig, platform: str) -> ModelConfig:
    """cfg as the dry run compiles it on `platform`.

    On CPU the "cudnn" and "pallas" attention paths cannot be compiled for the target (cuDNN
    needs a GPU; Pallas on CPU is the interpreter), so the plain-jnp "xla" attention stands in
    for them. It materialises the [B, H, T, S] scores, so its temporaries bound the fused
    kernels' from above.
    """
    if platform == "cpu" and cfg.attention_impl != "xla":
        return cfg.replace(attention_impl="xla")
    return cfg


def cost_twin_config(cfg: ModelConfig, num_layers: int) -> ModelConfig:
    """cfg with `num_layers` unrolled layers: a loop-free program whose FLOPs XLA counts."""
    return cfg.replace(num_layers=num_layers, scan_layers=False)


# ----------------------------------------------------------------------------- PPO

def ppo_update_flops(cfg: ModelConfig, rows: int, length: int, critic: str) -> float:
    """Matmul FLOPs of one PPO minibatch update on [rows, length] tokens (all devices): the
    policy's gradient step, plus a separate critic's (same trunk, scalar head) when
    critic="separate"; a shared value head adds only E FLOPs per token, not counted."""
    remat = cfg.remat_policy != "none"
    flops = mm.train_flops(cfg, rows, length, remat=remat)
    if critic == "separate":
        flops += mm.train_flops(cfg, rows, length, remat=remat, lm_head=False)
    return flops


@dataclasses.dataclass(frozen=True)
class _PPOParts:
    """The abstract models, state and shapes one PPO plan is built from.

    rows = prompts x samples per iteration; M the minibatch; P, N, S prompt, response and
    sequence lengths; updates per iteration = epochs x minibatches.
    """
    s: settings.StageSettings
    cfg: ModelConfig
    mesh: Mesh
    ms: mm.MeshShape
    rows: int
    updates: int
    P: int
    N: int
    S: int
    M: int
    frozen: Any
    gathered: bool
    model: Any
    policy_model: Any
    ref_model: Any
    rm: Any
    tx: Any
    state: Any
    ref: Any
    rm_params: Any
    rollout_params: Any


def _ppo_parts(s: settings.StageSettings, cfg: ModelConfig, mesh: Mesh) -> _PPOParts:
    """Sizes checked as the stage checks them; abstract sharded state and frozen models."""
    from instructjax.rlhf import actor_critic as ac
    from instructjax.stages import ppo as ppo_stage

    ppo = s.ppo
    rows, minibatches = ppo_stage.check_sizes(ppo)
    P, N = ppo.hyper.prompt_len, ppo.sampling.max_new_tokens
    frozen = jnp.dtype(ppo.frozen_dtype)
    model = ac.make_actor_critic(ppo.critic, cfg, cfg)
    rm = RewardModel(cfg)
    tx = ppo_stage.make_tx(ppo, s.optim)
    state = _state(lambda rng: init_boxed_params(model, rng), tx, mesh)
    policy_params = ac.policy_params(state.params)
    # what the rollout decodes from (ppo.rollout_weights): the training params, or a copy in
    # the compute dtype gathered over fsdp, which a rollout holds beside the training state
    gathered = ppo.rollout_weights == "gathered"
    rollout_params = policy_params
    if gathered:
        rollout_params = aot.cast_abstract(aot.with_shardings(
            policy_params, mesh_lib.decoding_shardings(
                jax.tree.map(lambda a: a.sharding, policy_params))), jnp.dtype(cfg.dtype))
    return _PPOParts(
        s=s, cfg=cfg, mesh=mesh, ms=mesh_shape(mesh), rows=rows,
        updates=ppo.epochs * minibatches, P=P, N=N, S=P + N, M=ppo.hyper.chunk, frozen=frozen,
        gathered=gathered, model=model, policy_model=Transformer(cfg),
        ref_model=Transformer(cfg), rm=rm, tx=tx, state=state,
        ref=aot.cast_abstract(_params(Transformer(cfg), mesh), frozen),
        rm_params=aot.cast_abstract(_params(rm, mesh), frozen), rollout_params=rollout_params)


def _ppo_accounting(x: _PPOParts) -> tuple[dict, dict, dict, dict]:
    """(closed-form buffer bytes, resident bytes, parameter counts, closed-form FLOPs per
    device per iteration) of a PPO plan."""
    from instructjax.rlhf import actor_critic as ac
    cfg, ms, critic = x.cfg, x.ms, x.s.ppo.critic
    lm, head = mm.transformer_split(cfg), mm.transformer_split(cfg, scalar_heads=1)
    trainable = head if critic == "shared" else mm.ParamSplit(
        *(a + b for a, b in zip(dataclasses.astuple(lm), dataclasses.astuple(head))))
    cf = {"policy_params": mm.param_bytes_per_device(trainable, ms, 4),
          "policy_opt_state": mm.adam_bytes_per_device(trainable, ms),
          "reference_params": mm.param_bytes_per_device(lm, ms, x.frozen.itemsize),
          "reward_params": mm.param_bytes_per_device(head, ms, x.frozen.itemsize),
          "experience_buffer": mm.batch_bytes_per_device(x.rows, (2 * x.S + 5 * x.N) * 4, ms),
          "kv_cache": mm.kv_cache_bytes_per_device(cfg, x.rows, x.S - 1, ms,
                                                   jnp.dtype(cfg.dtype).itemsize)}
    resident = {"policy_params": aot.bytes_per_device(x.state.params),
                "policy_opt_state": aot.bytes_per_device(x.state.opt_state),
                "reference_params": aot.bytes_per_device(x.ref),
                "reward_params": aot.bytes_per_device(x.rm_params),
                "experience_buffer": int(cf["experience_buffer"])}
    params = {"policy": aot.count_leaves(ac.policy_params(x.state.params)),
              "reference": aot.count_leaves(x.ref),
              "reward_model": aot.count_leaves(x.rm_params)}
    head_name = "value_head" if critic == "shared" else "critic"
    params[head_name] = aot.count_leaves(x.state.params[head_name])
    fwd, rows, S = mm.forward_flops, x.rows, x.S
    flops = {"rollout": fwd(cfg, rows, x.P) + (x.N - 1) * fwd(cfg, rows, 1, context=S - 1),
             # the actor, and a separate critic (scalar head) when there is one
             "policy_forward": fwd(cfg, rows, S) + (fwd(cfg, rows, S, lm_head=False)
                                                    if critic == "separate" else 0.0),
             "reference_forward": fwd(cfg, rows, S),
             "reward_forward": fwd(cfg, rows, S, lm_head=False),
             "ppo_update": x.updates * ppo_update_flops(cfg, x.M, S, critic)}
    devices = ms.data * ms.fsdp * ms.tensor
    return cf, resident, params, {k: v / devices for k, v in flops.items()}


def _rollout_programs(x: _PPOParts, *, twin: bool) -> list[Program]:
    """The whole generate; its twins are the prefill and one decode step (N - 1 calls)."""
    from instructjax.rlhf import rollout as rollout_lib
    from instructjax.rlhf.scoring import positions_from_mask
    cfg, mesh, rows, P, S = x.cfg, x.mesh, x.rows, x.P, x.S
    i32 = jnp.int32
    if not twin:
        prompts = x.s.ppo.prompts_per_iteration
        generate = jax.jit(lambda prm, toks, msk, rng: rollout_lib.generate(
            x.policy_model, prm, toks, msk, rng, **x.s.ppo.sampling.options(
                greedy=False, eos_id=EOS_ID, pad_id=PAD_ID)))
        rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                   sharding=mesh_lib.replicated(mesh))
        lm = mm.transformer_split(cfg)
        weight_bytes = (mm.param_bytes_per_device(lm, dataclasses.replace(x.ms, fsdp=1),
                                                  jnp.dtype(cfg.dtype).itemsize)
                        if x.gathered else mm.param_bytes_per_device(lm, x.ms, 4))
        return [Program(
            "rollout", generate,
            (x.rollout_params, _batch((prompts, P), i32, mesh), _batch((prompts, P), i32, mesh),
             rng),
            holds=() if x.gathered else ("policy_params",),  # the copy is its own argument
            closed_form_argument_bytes=weight_bytes
            + mm.batch_bytes_per_device(prompts, 2 * P * 4, x.ms) + 8)]
    cache_shardings = nn.logical_to_mesh_sharding(
        cache_lib.logical_partition_specs(), mesh, mesh_lib.LOGICAL_AXIS_RULES)
    cache = aot.with_shardings(jax.eval_shape(lambda: cache_lib.init_cache(cfg, rows, S - 1)),
                               cache_shardings)

    def prefill(prm, toks, msk, kv_mask):
        return x.policy_model.apply({"params": prm}, toks, positions_from_mask(msk),
                                    cache_lib.init_cache(cfg, rows, S - 1), 0, kv_mask,
                                    method="decode")

    def decode(prm, kv, last, pos, kv_mask):
        return x.policy_model.apply({"params": prm}, last, pos, kv, P, kv_mask, method="decode")

    kv_mask = _batch((rows, S - 1), i32, mesh)
    return [Program("rollout", prefill, (x.rollout_params, _batch((rows, P), i32, mesh),
                                         _batch((rows, P), i32, mesh), kv_mask)),
            Program("rollout", decode, (x.rollout_params, cache, _batch((rows, 1), i32, mesh),
                                        _batch((rows, 1), i32, mesh), kv_mask),
                    calls=x.N - 1)]


def _training_programs(x: _PPOParts, cf: dict, *, twin: bool) -> list[Program]:
    """Policy / reference / reward forwards over the rollout batch (twins: one chunk each,
    rows / M calls) and one PPO minibatch update (epochs x minibatches calls)."""
    from instructjax.rlhf import experience as exp_lib
    from instructjax.train.losses import lm_loss_fn
    cfg, mesh, ms, hp, M, N, S = x.cfg, x.mesh, x.ms, x.s.ppo.hyper, x.M, x.N, x.S
    fwd_rows, fwd_calls = (M, x.rows // M) if twin else (x.rows, 1)
    tokens, mask = _batch((fwd_rows, S), jnp.int32, mesh), _batch((fwd_rows, S), jnp.int32, mesh)
    seq_in = mm.batch_bytes_per_device(fwd_rows, 2 * S * 4, ms)
    # the reward model never reads an untied LM head, and XLA does not count unread arguments
    unread_head = 0.0 if cfg.tie_embeddings else mm.param_bytes_per_device(
        mm.ParamSplit(cfg.embed_dim * cfg.vocab_size, 0, 0, 0), ms, x.frozen.itemsize)
    f32 = jnp.float32
    minibatch = exp_lib.Experience(
        tokens=_batch((M, S), jnp.int32, mesh), mask=_batch((M, S), jnp.int32, mesh),
        response_mask=_batch((M, N), f32, mesh), old_logprobs=_batch((M, N), f32, mesh),
        old_values=_batch((M, N), f32, mesh), advantages=_batch((M, N), f32, mesh),
        returns=_batch((M, N), f32, mesh))
    ptx_loss, ptx_batch, ptx_bytes = None, None, 0.0
    if hp.ptx_coef > 0:
        ptx_loss = lm_loss_fn(x.policy_model)
        ptx_rows, seq_len = x.s.ppo.ptx_batch_size, x.s.data.seq_len
        ptx_batch = _lm_batch(ptx_rows, seq_len, mesh)
        ptx_bytes = mm.batch_bytes_per_device(ptx_rows, 5 * seq_len * 4, ms)
    return [
        Program("policy_forward", exp_lib.make_policy_forward(x.model, hp),
                (x.state.params, tokens, mask), calls=fwd_calls, holds=("policy_params",),
                closed_form_argument_bytes=cf["policy_params"] + seq_in),
        Program("reference_forward", exp_lib.make_reference_forward(x.ref_model, hp),
                (x.ref, tokens, mask), calls=fwd_calls, holds=("reference_params",),
                closed_form_argument_bytes=cf["reference_params"] + seq_in),
        Program("reward_forward", exp_lib.make_reward_forward(x.rm, hp),
                (x.rm_params, tokens, mask), calls=fwd_calls, holds=("reward_params",),
                closed_form_argument_bytes=cf["reward_params"] - unread_head + seq_in),
        Program("ppo_update", exp_lib.make_update(x.model, x.tx, hp, ptx_loss),
                (x.state, minibatch, ptx_batch), calls=x.updates,
                holds=("policy_params", "policy_opt_state"),
                closed_form_argument_bytes=cf["policy_params"] + cf["policy_opt_state"]
                + mm.batch_bytes_per_device(M, (2 * S + 5 * N) * 4, ms) + ptx_bytes)]


def ppo_plan(s: settings.StageSettings, cfg: ModelConfig, mesh: Mesh, *, twin: bool) -> Plan:
    """The PPO iteration's programs at model config `cfg`.

    twin=False: rollout (the whole generate), policy / reference / reward forwards over the
    rollout batch, one PPO update. twin=True: the loop-free cost twins -- prefill and one
    decode step over the rollout rows, each forward over one chunk, one update -- with the
    number of times each runs per iteration.
    """
    parts = _ppo_parts(s, cfg, mesh)
    cf, resident, params, flops = _ppo_accounting(parts)
    programs = _rollout_programs(parts, twin=twin) + _training_programs(parts, cf, twin=twin)
    return Plan(params=params, resident=resident, closed_form=cf, closed_form_flops=flops,
                programs=programs)


# ----------------------------------------------------------------------------- supervised

def supervised_plan(s: settings.StageSettings, cfg: ModelConfig, mesh: Mesh, *,
                    twin: bool) -> Plan:
    """The train step of pretrain / SFT (LM loss) or the reward stage (K-way ranking loss).

    The cost twin runs the whole batch without gradient accumulation (same FLOPs, no loop).
    """
    from instructjax.stages import reward as reward_stage
    from instructjax.train import optim, step as step_lib
    from instructjax.train.losses import lm_loss_fn

    batch_size, seq_len = s.train_batch_size, s.data.seq_len
    accum = 1 if twin else s.loop.grad_accum_steps
    ms = mesh_shape(mesh)
    tx, schedule = optim.make_optimizer(s.optim), optim.make_schedule(s.optim)
    if s.stage == "reward":
        model = RewardModel(cfg)
        loss_fn = reward_stage.reward_loss_fn(model)
        K = s.reward.num_responses or DEFAULT_NUM_RESPONSES
        batch = {"tokens": _batch((batch_size, K, seq_len), jnp.int32, mesh),
                 "lengths": _batch((batch_size, K), jnp.int32, mesh),
                 "ranks": _batch((batch_size, K), jnp.int32, mesh)}
        split, rows = mm.transformer_split(cfg, scalar_heads=1), batch_size * K
        batch_bytes = mm.batch_bytes_per_device(batch_size, K * (seq_len + 2) * 4, ms)
        flops = mm.train_flops(cfg, rows, seq_len, remat=cfg.remat_policy != "none")
        name = "reward_model"
    else:
        model = Transformer(cfg)
        loss_fn = lm_loss_fn(model)
        batch = _lm_batch(batch_size, seq_len, mesh)
        split = mm.transformer_split(cfg)
        batch_bytes = mm.batch_bytes_per_device(batch_size, 5 * seq_len * 4, ms)
        flops = mm.train_flops(cfg, batch_size, seq_len, remat=cfg.remat_policy != "none")
        name = "model"
    state = _state(lambda rng: init_boxed_params(model, rng), tx, mesh)
    step = step_lib.make_train_step(loss_fn, tx, schedule, grad_accum_steps=accum)
    shardings = jax.tree.map(lambda a: a.sharding, state)
    jitted = step_lib.jit_train_step(step, shardings, mesh, {k: v.ndim for k, v in batch.items()})
    cf = {"params": mm.param_bytes_per_device(split, ms, 4),
          "opt_state": mm.adam_bytes_per_device(split, ms)}
    resident = {"params": aot.bytes_per_device(state.params),
                "opt_state": aot.bytes_per_device(state.opt_state)}
    program = Program("train_step", jitted, (state, batch), holds=("params", "opt_state"),
                      closed_form_argument_bytes=cf["params"] + cf["opt_state"] + batch_bytes)
    devices = ms.data * ms.fsdp * ms.tensor
    return Plan(params={name: aot.count_leaves(state.params)}, resident=resident,
                closed_form=cf, closed_form_flops={"train_step": flops / devices},
                programs=[program])


PLANS = {"ppo": ppo_plan, "pretrain": supervised_plan, "sft": supervised_plan,
         "reward": supervised_plan}


# ----------------------------------------------------------------------------- run

def closed_form_params(s: settings.StageSettings, cfg: ModelConfig) -> dict[str, int]:
    """Parameter count of each model from count_params (the numbers the plan must match)."""
    n, head = count_params(cfg), cfg.embed_dim + 1
    if s.stage == "ppo":
        out = {"policy": n, "reference": n, "reward_model": n + head}
        shared = s.ppo.critic == "shared"
        out["value_head" if shared else "critic"] = head if shared else n + head
        return out
    return {"reward_model": n + head} if s.stage == "reward" else {"model": n}


def compile_plan(plan: Plan, mesh: Mesh) -> dict[str, list[aot.ProgramReport]]:
    """Compiles every program of `plan` under `mesh`; name -> reports in plan order."""
    options = aot.fast_compile_options(mesh.devices.flat[0].platform)
    reports: dict[str, list] = {}
    with mesh_lib.activate(mesh):
        for program in plan.programs:
            reports.setdefault(program.name, []).append(
                aot.compile_program(program.fn, program.args, compiler_options=options))
    return reports


def step_costs(s: settings.StageSettings, cfg: ModelConfig, mesh: Mesh) -> tuple[dict, dict, float]:
    """Per-device FLOPs, bytes accessed and roofline seconds per step of each program.

    From the cost twins at 1 and 2 unrolled layers, extrapolated to cfg.num_layers.
    Returns (flops by program, seconds by program, compile seconds of the twins).
    """
    plan_fn, hw = PLANS[s.stage], s.hardware
    twins = [plan_fn(s, cost_twin_config(cfg, n), mesh, twin=True) for n in (1, 2)]
    compiled, compile_s = [], 0.0
    for twin in twins:
        reports = compile_plan(twin, mesh)
        compile_s += sum(r.compile_seconds for rs in reports.values() for r in rs)
        compiled.append(reports)
    flops, seconds = {}, {}
    for i, program in enumerate(twins[0].programs):
        index = [j for j, q in enumerate(twins[0].programs[:i + 1]) if q.name == program.name]
        k = len(index) - 1  # which twin of this name
        one, two = compiled[0][program.name][k], compiled[1][program.name][k]
        f = aot.extrapolate_layers(one.flops, two.flops, cfg.num_layers)
        b = aot.extrapolate_layers(one.bytes_accessed, two.bytes_accessed, cfg.num_layers)
        flops[program.name] = flops.get(program.name, 0.0) + program.calls * f
        seconds[program.name] = seconds.get(program.name, 0.0) + program.calls * aot.step_seconds(
            f, b, peak_tflops=hw.peak_tflops, hbm_gbps=hw.hbm_gbps)
    return flops, seconds, compile_s


def dry_run(s: settings.StageSettings) -> dict:
    """Builds, compiles and measures the stage's programs; returns the dry_run.json dict."""
    wall = time.perf_counter()
    devices = aot.target_devices(s.hardware.num_devices)
    mesh = mesh_lib.make_mesh(dict(s.mesh), devices)
    cfg = compiled_model_config(model_config(s.model), devices[0].platform)
    if s.stage == "ppo":
        mesh_lib.check_fits(mesh, global_batch=s.ppo.minibatch_size,
                            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads)
    else:
        mesh_lib.check_fits(mesh, global_batch=s.train_batch_size,
                            num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                            micro_batches=s.loop.grad_accum_steps)
    plan = PLANS[s.stage](s, cfg, mesh, twin=False)
    reports = {name: rs[0] for name, rs in compile_plan(plan, mesh).items()}
    if s.hardware.peak_tflops > 0:
        flops, seconds, twin_compile_s = step_costs(s, cfg, mesh)
    else:  # no peak, no step time: skip the cost twins' compiles
        flops, seconds, twin_compile_s = {}, {}, 0.0

    programs = {}
    for program in plan.programs:
        r = reports[program.name]
        others = sum(v for k, v in plan.resident.items() if k not in program.holds)
        programs[program.name] = {
            "calls_per_step": program.calls,
            **{k: getattr(r, k) for k in ("argument_bytes", "output_bytes", "alias_bytes",
                                          "temp_bytes", "code_bytes")},
            "peak_bytes": r.peak_bytes,
            "resident_other_bytes": others,
            "total_bytes": r.peak_bytes + others,
            "closed_form_argument_bytes": program.closed_form_argument_bytes,
            "xla_flops_per_call_loops_once": r.flops,
            "flops_per_device_per_step": flops.get(program.name),
            "closed_form_flops_per_device_per_step": plan.closed_form_flops[program.name],
            "seconds_per_step": seconds.get(program.name),
            "compile_seconds": r.compile_seconds,
        }
    return {
        "stage": s.stage,
        "hardware": dataclasses.asdict(s.hardware),
        "devices": {"count": len(devices), "platform": devices[0].platform,
                    "virtual": devices[0].platform == "cpu" and len(devices) > 1},
        "mesh": {axis: int(mesh.shape[axis]) for axis in mesh_lib.MESH_AXES},
        "model": cfg.to_dict(),  # as compiled (attention_impl may stand in, see above)
        "params": plan.params,
        "closed_form_params": closed_form_params(s, cfg),
        "resident_bytes_per_device": plan.resident,
        "closed_form_bytes_per_device": plan.closed_form,
        "programs": programs,
        "step_seconds": sum(seconds.values()) if seconds else None,
        "step_flops_per_device": sum(flops.values()) if flops else None,
        "compile_seconds": sum(r.compile_seconds for r in reports.values()),
        "cost_twin_compile_seconds": twin_compile_s,
        "wall_seconds": time.perf_counter() - wall,
    }


def run(config: Any, workdir: str) -> dict:
    """The dry run of `config.stage`: table on stdout, WORKDIR/dry_run.json, budget check.

    Must be called before anything initialises jax's backends (experiments/run.py does),
    so that the declared number of virtual devices can still be requested.
    Raises StageError for an unsupported stage or a program over the memory budget.
    """
    if config.stage not in SUPPORTED:
        raise common.StageError(f"dry_run supports stages {SUPPORTED}, not {config.stage!r} "
                                "(dry-run each stage's config of a pipeline)")
    s = settings.from_config(config)
    if s.hardware.num_devices > 0:
        try:
            aot.request_cpu_devices(s.hardware.num_devices)
        except aot.VirtualDevicesError as err:
            raise common.StageError(str(err)) from err
    try:
        result = dry_run(s)
    except aot.VirtualDevicesError as err:
        raise common.StageError(str(err)) from err
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, DRY_RUN_FILE), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(dry_run_report.format_table(result), flush=True)
    over = dry_run_report.over_budget(result)
    if over is not None:
        name, gb = over
        raise common.StageError(
            f"dry run: program {name!r} needs {gb:.2f} GB per device, more than "
            f"hardware.memory_per_device_gb={result['hardware']['memory_per_device_gb']}")
    return result
