"""Stage 3: PPO RLHF -- rollout, reference, reward, advantages, updates, log -- in named phases.

The policy starts from the SFT stage (`config.init_from`), the frozen reference is a copy of
it, and the reward model and its score statistics come from `config.ppo.reward_from`.
One iteration: sample responses to a batch of prompts with the KV-cache rollout engine, compute
old log-probs / values / reference log-probs / scores ONCE, build advantages, then run
`ppo.epochs` passes of minibatch updates over that frozen buffer.

Reading order: `setup` (everything built once, returned as one frozen `PPORun`), then
`ppo_iteration` (`rollout_and_score` -> `update_epochs` -> KL controller -> `iteration_row`),
then `run` (resume or start, the loop of iterations, eval, checkpoint; the skeleton is
train/lifecycle.py, shared with the supervised loop).

Multi-host: every process runs this same function (after `common.initialize_distributed`).
Each reads its own shard of the prompts (and PPO-ptx text), which are assembled into global
arrays on the mesh; rollout, forwards and updates run sharded over all devices; metrics and
eval answers are reduced or gathered on device so every process sees the same numbers;
only process 0 writes logs and run records; orbax saves and restores from every process;
SIGTERM (or JAX's preemption notice) stops all processes after the same iteration.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from instructjax.data import (chat_encoding, demo_corpus, dialogue_sources, formats, jsonl,
                              loaders, packing, text_sources)
from instructjax.eval import true_score as true_score_lib
from instructjax.model.heads import RewardModel, ScalarHead
from instructjax.parallel import mesh as mesh_lib
from instructjax.parallel.batch import make_global_batch
from instructjax.model.transformer import Transformer, init_boxed_params
from instructjax.rlhf import actor_critic as ac
from instructjax.rlhf import experience as exp_lib
from instructjax.rlhf import kl as kl_lib
from instructjax.rlhf import reward_stats, rollout
from instructjax.stages import common, open_models, settings, workdirs
from instructjax.train import checkpoint as ckpt_lib
from instructjax.train import host_state, lifecycle
from instructjax.train import metrics as metrics_lib
from instructjax.train import divergence, optim, preemption as preemption_lib
from instructjax.train import state as state_lib
from instructjax.train.losses import lm_loss_fn


# ------------------------------------------------------------------------------ setup

ROLLOUT_WEIGHTS = ("train", "gathered")


def check_sizes(ppo: settings.PPOSettings, num_processes: int = 1,
                batch_shards: int = 1) -> tuple[int, int]:
    """(rollout batch B = prompts x samples, minibatches per epoch), validated.

    Args:
        ppo: the stage's PPO settings.
        num_processes: processes that each read prompts_per_iteration / num_processes
            prompts (and ptx_batch_size / num_processes PPO-ptx rows).
        batch_shards: devices the batch dim is split over (mesh data x fsdp); prompts and
            minibatches must divide over them.
    """
    batch = ppo.prompts_per_iteration * ppo.sampling.num_samples
    if batch % ppo.minibatch_size:
        raise common.StageError(
            f"ppo.prompts_per_iteration x ppo.num_samples = {batch} must be a multiple of "
            f"ppo.minibatch_size = {ppo.minibatch_size}")
    for key, rows in (("prompts_per_iteration", ppo.prompts_per_iteration),
                      ("minibatch_size", ppo.minibatch_size)):
        if rows % batch_shards:
            raise common.StageError(f"ppo.{key}={rows} must divide over the mesh's batch "
                                    f"axes data x fsdp = {batch_shards} devices")
    if ppo.prompts_per_iteration % num_processes:
        raise common.StageError(f"ppo.prompts_per_iteration={ppo.prompts_per_iteration} must "
                                f"divide over {num_processes} processes")
    if ppo.hyper.ptx_coef > 0 and ppo.ptx_batch_size % (num_processes * batch_shards):
        raise common.StageError(f"ppo.ptx_batch_size={ppo.ptx_batch_size} must divide over "
                                f"{num_processes} processes and {batch_shards} batch shards")
    if ppo.rollout_weights not in ROLLOUT_WEIGHTS:
        raise common.StageError(f"ppo.rollout_weights={ppo.rollout_weights!r}; valid: "
                                f"{ROLLOUT_WEIGHTS}")
    if ppo.critic not in ac.CRITICS:
        raise common.StageError(f"ppo.critic={ppo.critic!r}; valid: {ac.CRITICS}")
    return batch, batch // ppo.minibatch_size


def make_rollout_params(rollout_weights: str, policy_cfg, param_shardings) -> Any:
    """params -> the policy weights the rollout decodes from (`ppo.rollout_weights`).

    param_shardings: NamedShardings of the actor-critic params (the training state's).
    """
    if rollout_weights == "gathered":
        copy = mesh_lib.make_decoding_copy(ac.policy_params(param_shardings), policy_cfg.dtype)
        return lambda params: copy(ac.policy_params(params))
    return ac.policy_params


def make_tx(ppo: settings.PPOSettings, opt: optim.OptimConfig) -> optax.GradientTransformation:
    """AdamW for the policy (+ value head); a separate critic gets its own learning rate.

    opt: the policy's optimiser, total_steps = iterations x epochs x minibatches.
    """
    actor_tx = optim.make_optimizer(opt)
    if ppo.critic == "shared":
        return actor_tx
    critic_opt = dataclasses.replace(opt, learning_rate=ppo.critic_learning_rate)
    return optax.multi_transform({"actor": actor_tx, "critic": optim.make_optimizer(critic_opt)},
                                 lambda params: {name: name for name in params})


def load_reward_model(reward_dir: str, model: dict, mesh):
    """(RewardModel, params placed on mesh, score stats) of a finished reward stage, or of a
    Hugging Face `...ForSequenceClassification` directory (stats None: `setup` computes
    them); runtime model fields from `model` (`config.model`)."""
    if open_models.is_hf_model_dir(reward_dir):
        rm_cfg, params = open_models.load_hf_reward(reward_dir, model, mesh)
        return RewardModel(rm_cfg), params, None
    info = workdirs.read_run_info(reward_dir)
    if info.get("stage") != "reward":
        raise common.StageError(f"ppo.reward_from={reward_dir!r} is a {info.get('stage')!r} "
                                "stage, not a reward stage")
    rm = RewardModel(workdirs.model_config_from(info, model))
    params = workdirs.load_params(reward_dir, rm, mesh)
    return rm, params, workdirs.read_reward_stats(reward_dir)


# Training prompts sampled for an imported reward model's score statistics.
IMPORTED_RM_STAT_PROMPTS = 256


def imported_reward_stats(s: settings.StageSettings, workdir: str, rm, rm_params, policy,
                          policy_params, tokenizer) -> dict:
    """Score mean / std of a reward model PPO did not get from our reward stage, over one
    SFT-policy answer on each of the first IMPORTED_RM_STAT_PROMPTS training prompts (as the
    reward stage computes them for ours); computed once, kept in WORKDIR/reward_stats.json."""
    path = os.path.join(workdir, workdirs.REWARD_STATS)
    if os.path.exists(path):
        return workdirs.read_reward_stats(workdir)
    train_paths, _ = workdirs.stage_data_paths(s.data, workdir, "prompts_train", "prompts_eval")
    prompts = dialogue_sources.read_records(train_paths, "prompt",
                                            skip_malformed=s.data.skip_malformed)[0]
    prompts = prompts[:IMPORTED_RM_STAT_PROMPTS]
    tokens, mask = true_score_lib.encode_prompts(
        prompts, tokenizer, s.chat.template_for(tokenizer), max_prompt_len=s.ppo.hyper.prompt_len,
        max_turns=s.chat.max_turns)
    stats = reward_stats.score_statistics(
        policy, policy_params, rm, rm_params, tokens, mask, sampling=s.ppo.sampling,
        eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id,
        batch_size=min(len(prompts), s.ppo.prompts_per_iteration), seed=s.seed)
    workdirs.write_reward_stats(workdir, stats)
    lifecycle.say("ppo", f"imported reward model's score over SFT samples: mean "
                         f"{stats['mean']:.4f} std {stats['std']:.4f} (n={stats['num_samples']})")
    return stats


def cast_frozen(params, dtype: str):
    """Frozen models may be stored in bf16 (no optimiser state, half the memory)."""
    return jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)


def frozen_checksums(ref_params, rm_params) -> tuple[float, float]:
    """(reference, reward model) parameter checksums: sum of x and of x^2 over all leaves.

    Compared before and after PPO; any write into a frozen model changes them. One jitted
    program for both (on CPU with several processes, a long queue of small eager programs,
    each with its own cross-process reduction, was seen to deadlock the gloo collectives).
    """
    def checksum(tree):
        return sum(jnp.sum(x.astype(jnp.float32)) + jnp.sum(jnp.square(x.astype(jnp.float32)))
                   for x in jax.tree.leaves(tree))
    ref_sum, rm_sum = jax.device_get(jax.jit(lambda a, b: (checksum(a), checksum(b)))(
        ref_params, rm_params))
    return float(ref_sum), float(rm_sum)


def update_means(update_stats: list[dict]) -> dict[str, float]:
    """Per-iteration means of the minibatch update stats, plus the first minibatch's ratio
    (exactly 1 when the rollout and update log-probs agree); {} when no update ran."""
    if not update_stats:
        return {}
    means = {k: float(np.mean([s[k] for s in update_stats])) for k in update_stats[0]}
    return {**means, "first_minibatch_ratio": float(update_stats[0]["ratio_mean"])}


def prompt_example(prompt: formats.Prompt, *, tokenizer, template, max_prompt_len: int,
                   max_turns: int, on_truncate: chat_encoding.OnTruncate = None
                   ) -> dict[str, np.ndarray]:
    """One prompt -> left-padded {"tokens" int32 [P], "mask" int32 [P]}."""
    ids = chat_encoding.encode_prompt(prompt, tokenizer, template, max_length=max_prompt_len,
                                      max_turns=max_turns, on_truncate=on_truncate)
    tokens, mask = packing.left_pad([ids], tokenizer.pad_id, max_prompt_len)
    return {"tokens": tokens[0], "mask": mask[0]}


@dataclasses.dataclass(frozen=True)
class Phases:
    """The jitted phases of one iteration (rlhf/experience.py), built once."""
    rollout_params: Any     # train params -> the policy weights the rollout decodes from
    policy_forward: Any     # -> old log-probs, values, entropy
    reference_forward: Any  # -> reference log-probs
    reward_forward: Any     # -> raw reward-model scores
    advantages: Any         # -> (Experience, stats)
    update: Any             # (state, minibatch, ptx batch) -> (state, stats)


@dataclasses.dataclass(frozen=True)
class PPORun:
    """Everything PPO's iterations read, built once by `setup`.

    models: the actor-critic `model` (trained), `policy_model` (its trunk, for sampling and
    eval), the frozen reference and reward models' params (`ref_params`, `rm_params`) and the
    RM's score normalisation (`gain`, `bias`). Data: this process's prompt (and PPO-ptx)
    batch iterators and the demo eval prompt sets (None for user data).
    """
    s: settings.StageSettings
    mesh: Any
    tokenizer: Any
    policy_cfg: Any
    model: Any
    policy_model: Any
    tx: Any
    abstract: Any
    shardings: Any
    init_boxed: Any
    initial_params: Any     # () -> the actor-critic params a fresh run starts from
    ref_params: Any
    rm_params: Any
    gain: float
    bias: float
    rollout_batch: int
    minibatches: int
    phases: Phases
    prompt_batches: Iterator[dict]
    ptx_batches: Iterator[dict] | None
    eval_sets: dict | None


def setup(s: settings.StageSettings, workdir: str) -> PPORun:
    """Loads the SFT policy, the reward model and the data; builds the optimiser and the
    jitted phases. Nothing is trained or written to the run's checkpoints here."""
    ppo = s.ppo
    _, policy_cfg, tokenizer = workdirs.init_from_stage(s.init_from, s.model, workdir, ("sft",))
    if not ppo.reward_from:
        raise common.StageError("config.ppo.reward_from is empty: point it at a finished "
                                "reward stage directory")
    # check_sizes checks the batches; the heads are the policy's (an imported model's differ
    # from config.model's preset)
    mesh = common.build_mesh(s.mesh, policy_cfg.to_dict(), global_batch=None)
    rollout_batch, minibatches = check_sizes(ppo, jax.process_count(),
                                             mesh_lib.batch_axis_size(mesh))
    rm, rm_params, rm_stats = load_reward_model(ppo.reward_from, s.model, mesh)
    model = ac.make_actor_critic(ppo.critic, policy_cfg, rm.cfg)
    sft_params = workdirs.load_transformer_params(s.init_from, policy_cfg, mesh)
    if rm_stats is None:
        open_models.check_same_tokenizer(tokenizer, ppo.reward_from)
        # every process samples (the policy is sharded over all of them); process 0 writes
        rm_stats = imported_reward_stats(s, workdir, rm, rm_params, Transformer(policy_cfg),
                                         sft_params, tokenizer)
    # the frozen copies; a separate critic starts from the reward model as stored here
    ref_params = cast_frozen(sft_params, ppo.frozen_dtype)
    rm_params = cast_frozen(rm_params, ppo.frozen_dtype)
    gain = 1.0 / max(rm_stats["std"], 1e-6)
    bias = -rm_stats["mean"] * gain

    def init_boxed(rng):
        return init_boxed_params(model, rng)

    def initial_params():
        if ppo.critic == "shared":  # zero-initialised value head (OpenAI)
            head = ScalarHead(0.0).init(jax.random.key(0), jnp.zeros((1, 1, policy_cfg.embed_dim)))
            return {"trunk": sft_params, "value_head": nn.meta.unbox(head["params"])}
        return {"actor": sft_params, "critic": ac.critic_from_reward_model(rm_params, gain, bias)}

    tx = make_tx(ppo, s.optim)
    abstract, shardings = state_lib.state_shardings(init_boxed, tx, mesh)
    # files (demo data, TFDS builds) are written by process 0 first
    prompt_batches, ptx_batches, eval_sets = common.main_process_first(
        lambda: _data(s, workdir, tokenizer), "ppo-data")
    policy_model = Transformer(policy_cfg)  # the policy's trunk alone, for sampling
    hp = ppo.hyper
    phases = Phases(
        rollout_params=make_rollout_params(ppo.rollout_weights, policy_cfg, shardings.params),
        policy_forward=exp_lib.make_policy_forward(model, hp),
        reference_forward=exp_lib.make_reference_forward(Transformer(policy_cfg), hp),
        reward_forward=exp_lib.make_reward_forward(rm, hp),
        advantages=exp_lib.make_advantages(hp),
        update=exp_lib.make_update(model, tx, hp, lm_loss_fn(policy_model)
                                   if ptx_batches is not None else None))
    return PPORun(s=s, mesh=mesh, tokenizer=tokenizer, policy_cfg=policy_cfg, model=model,
                  policy_model=policy_model, tx=tx, abstract=abstract, shardings=shardings,
                  init_boxed=init_boxed, initial_params=initial_params,
                  ref_params=ref_params, rm_params=rm_params, gain=gain, bias=bias,
                  rollout_batch=rollout_batch, minibatches=minibatches, phases=phases,
                  prompt_batches=prompt_batches, ptx_batches=ptx_batches, eval_sets=eval_sets)


# ------------------------------------------------------------------------------ one iteration

def rollout_and_score(r: PPORun, params, kl_coef, gen_rng, times: lifecycle.PhaseTimes):
    """Phases rollout -> old log-probs / values -> reference -> reward -> advantages.

    Returns (Rollout, entropy float32 [B, N], Experience, advantage stats on the host).
    """
    with times("generation"):  # reading the prompts included
        prompts = make_global_batch(next(r.prompt_batches), r.mesh)
        out = jax.block_until_ready(rollout.generate(
            r.policy_model, r.phases.rollout_params(params), prompts["tokens"],
            prompts["mask"], gen_rng, **r.s.ppo.sampling.options(
                greedy=False, eos_id=r.tokenizer.eos_ids, pad_id=r.tokenizer.pad_id)))
    with times("policy_forward"):
        old_logprobs, old_values, entropy = jax.block_until_ready(
            r.phases.policy_forward(params, out.tokens, out.mask))
    with times("reference"):
        ref_logprobs = jax.block_until_ready(
            r.phases.reference_forward(r.ref_params, out.tokens, out.mask))
    with times("reward"):
        raw_scores = jax.block_until_ready(
            r.phases.reward_forward(r.rm_params, out.tokens, out.mask))
    experience, stats = r.phases.advantages(
        out.tokens, out.mask, out.response_mask, out.ended, old_logprobs, old_values,
        ref_logprobs, raw_scores, kl_coef, r.gain, r.bias)
    return out, entropy, experience, {k: float(v) for k, v in jax.device_get(stats).items()}


def update_epochs(r: PPORun, state, experience, shuffle_rng, *, on_bad) -> tuple[Any, list, int]:
    """ppo.epochs passes of minibatch updates over the frozen buffer.

    on_bad(stats, epoch, minibatch) is called at an iteration's first non-finite minibatch
    (which the update did not apply). Returns (state, per-minibatch stats, bad minibatches).
    """
    hp, update_stats, bad = r.s.ppo.hyper, [], 0
    for epoch in range(r.s.ppo.epochs):
        # computed alike on every process, passed to `take` as a host array
        order = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_rng, epoch),
                                                  r.rollout_batch))
        for m in range(r.minibatches):
            index = order[m * hp.chunk:(m + 1) * hp.chunk]
            ptx_batch = (make_global_batch(next(r.ptx_batches), r.mesh)
                         if r.ptx_batches is not None else None)
            state, stats = r.phases.update(state, exp_lib.take(experience, index), ptx_batch)
            # One update in flight at a time: CPU gloo collectives were seen to deadlock with
            # dozens of queued cross-process programs; on accelerators the next update waits
            # for this one's params anyway.
            stats = {k: float(v) for k, v in jax.device_get(stats).items()}
            update_stats.append(stats)
            if divergence.nonfinite_names(stats):  # not applied (the update guards it)
                bad += 1
                if bad == 1:  # counts once per iteration
                    on_bad(stats, epoch, m)
    return state, update_stats, bad


def iteration_row(r: PPORun, out, entropy, exp_stats: dict, update_stats: list,
                  times: lifecycle.PhaseTimes, kl_coef_used, bad_steps: int,
                  bad_minibatches: int) -> dict:
    """The iteration's metrics row (reduced on device: the rows may live on other processes)."""
    rollout_row = {k: float(v) for k, v in jax.device_get(
        exp_lib.rollout_stats(entropy, out.response_mask, out.ended)).items()}
    response_tokens = rollout_row.pop("response_tokens")
    return {**exp_stats, **times.seconds, **rollout_row, **update_means(update_stats),
            "kl_coef": float(jax.device_get(kl_coef_used)),  # beta of this iteration
            "rollout_tokens_per_sec": response_tokens / max(times.seconds["time_generation"],
                                                            1e-9),
            "skipped_steps": bad_steps, "skipped_minibatches": bad_minibatches}


def ppo_iteration(r: PPORun, state, kl_state, iteration: int, rng, guard, writer,
                  last_saved: int | None):
    """One PPO iteration: rollout and scores, advantages, updates, KL controller.

    A non-finite reward or KL poisons every advantage: that iteration updates nothing (and
    the KL coefficient stays). Returns (state, kl_state, metrics row).
    """
    gen_rng, shuffle_rng = jax.random.split(jax.random.fold_in(rng, iteration))
    times = lifecycle.PhaseTimes()
    position = {"iteration": iteration, "prompt_state": r.prompt_batches.get_state()}
    record = functools.partial(guard.record_and_check, writer, "diverged", iteration + 1,
                               last_checkpoint=last_saved, unit="iteration")
    out, entropy, experience, exp_stats = rollout_and_score(r, state.params, kl_state.kl_coef,
                                                            gen_rng, times)
    bad_rollout = record(exp_stats, position=position)
    update_stats, bad_minibatches = [], 0
    with times("training"):
        if not bad_rollout:
            state, update_stats, bad_minibatches = update_epochs(
                r, state, experience, shuffle_rng, on_bad=lambda stats, epoch, m: record(
                    stats, position={**position, "epoch": epoch, "minibatch": m}))
    kl_coef_used = kl_state.kl_coef
    if not bad_rollout:  # a NaN KL would stick in the adaptive coefficient
        kl_state = kl_lib.update_controller(r.s.ppo.kl, kl_state, jnp.float32(exp_stats["kl"]),
                                            r.rollout_batch)
    row = iteration_row(r, out, entropy, exp_stats, update_stats, times, kl_coef_used,
                        guard.bad_steps, bad_minibatches)
    return state, kl_state, row


# ------------------------------------------------------------------------------ the stage

def evaluate(r: PPORun, params, iteration: int, writer) -> dict:
    """The true-score eval of the policy on the demo eval sets ({} for user data)."""
    if not r.eval_sets:
        return {}
    result = true_score_lib.evaluate_sets(
        ac.policy_params(params), iteration, model=r.policy_model, tokenizer=r.tokenizer,
        template=r.s.chat.template_for(r.tokenizer), prompt_sets=r.eval_sets, eval_cfg=r.s.eval,
        mesh=r.mesh)
    writer.write(iteration, "eval", result)
    lifecycle.say("ppo", f"eval @ {iteration}: true_score {result['true_score']:.3f} "
                         f"(sampled {result['true_score_sampled']:.3f}, eos "
                         f"{result['eos_rate']:.2f}); held-out problems "
                         f"{result['heldout_true_score']:.3f} (sampled "
                         f"{result['heldout_true_score_sampled']:.3f})")
    return result


def _restore_positions(r: PPORun, meta: dict, workdir: str) -> None:
    """Puts this process's prompt (and PPO-ptx) iterators where the checkpoint left them;
    a checkpoint of another process count is refused."""
    if meta.get("process_count", 1) != jax.process_count():
        raise common.StageError(
            f"{workdir} was checkpointed by {meta.get('process_count', 1)} process(es); "
            f"resume it with the same number (now {jax.process_count()}): each process's "
            "data position belongs to its own shard")
    r.prompt_batches.set_state(
        host_state.state_from_meta(meta, "prompt_states", legacy_key="prompt_state"))
    if r.ptx_batches is not None:
        r.ptx_batches.set_state(host_state.state_from_meta(meta, "ptx_states",
                                                           legacy_key="ptx_state"))


def _checkpoint_meta(r: PPORun, kl_state, finished: bool, bad_steps: int) -> dict:
    """Every process's own iterator positions (orbax writes the JSON from process 0; the
    packed ptx streams differ per shard). A collective: every process calls it."""
    return {"prompt_states": host_state.gather_process_states(r.prompt_batches.get_state()),
            "finished": finished, "kl_coef": float(jax.device_get(kl_state.kl_coef)),
            "stage": "ppo",
            "ptx_states": (host_state.gather_process_states(r.ptx_batches.get_state())
                           if r.ptx_batches is not None else None),
            "process_count": jax.process_count(), "bad_steps": bad_steps}


def run(config: Any, workdir: str) -> dict:
    """Runs (or resumes, or skips if finished) PPO in `workdir`; returns the last metrics."""
    s = workdirs.start_stage(config, workdir)
    r = setup(s, workdir)
    cfg = s.loop
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=cfg.keep_checkpoints,
                                         async_save=cfg.async_checkpoint)
    writer = metrics_lib.MetricsWriter(workdir, enabled=common.is_main_process())
    # Both are closed on every way out, an exception included: pending asynchronous
    # saves are committed and the TensorBoard events flushed.
    with checkpointer, writer:
        start = lifecycle.resume_or_start(
            checkpointer, writer, ckpt_lib.abstract_with_shardings(r.abstract, r.shardings),
            cfg.steps, name="ppo", workdir=workdir, unit="iteration",
            fresh_state=lambda: state_lib.create_state(r.init_boxed, r.tx, r.shardings, s.seed,
                                                       r.initial_params()),
            export=lambda state: ckpt_lib.export_params(workdir, ac.policy_params(state.params)),
            restore_positions=lambda meta: _restore_positions(r, meta, workdir))
        if start.finished:
            return {}
        kl_state = (kl_lib.init_controller(s.ppo.kl) if start.meta is None else
                    kl_lib.KLControllerState(kl_coef=jnp.float32(start.meta["kl_coef"])))
        guard = divergence.BadStepGuard("ppo", cfg.max_bad_steps, start.bad_steps)
        last_saved = start.step if start.meta is not None else None
        workdirs.write_run_info(workdir, "ppo", r.policy_cfg,
                                {"reward_from": os.path.abspath(s.ppo.reward_from)})
        frozen_before = frozen_checksums(r.ref_params, r.rm_params)
        state, last, done = start.state, {}, start.step
        if done == 0:
            evaluate(r, state.params, 0, writer)
        rng = jax.random.fold_in(jax.random.key(s.seed), 7)
        progress = metrics_lib.Progress(cfg.steps, done, enabled=common.is_main_process(),
                                        stage="ppo")
        with preemption_lib.Preemption() as preemption, mesh_lib.activate(r.mesh):
            for iteration in range(start.step, cfg.steps):
                state, kl_state, last = ppo_iteration(r, state, kl_state, iteration, rng, guard,
                                                      writer, last_saved)
                done = iteration + 1
                writer.write(done, "train", last)
                progress.report(done, {k: last[k] for k in ("loss", "score", "kl") if k in last})
                if done % cfg.eval_every == 0 or done == cfg.steps:
                    last = {**last, **evaluate(r, state.params, done, writer)}
                point = lifecycle.save_point(preemption, done, cfg)
                if point.save:
                    checkpointer.save(done, state, _checkpoint_meta(r, kl_state, point.finished,
                                                                    guard.bad_steps))
                    last_saved = done
                if point.stop:
                    lifecycle.say("ppo", f"SIGTERM: saved iteration {done}, exiting")
                    break
    frozen_after = frozen_checksums(r.ref_params, r.rm_params)
    if frozen_after != frozen_before:  # e.g. a donated or aliased buffer: never silently
        raise RuntimeError(f"frozen models changed during PPO: {frozen_before} -> {frozen_after}")
    lifecycle.finish(workdir, done, cfg, ac.policy_params(state.params))
    return {**last, "frozen_checksums": frozen_after}


def _data(s: settings.StageSettings, workdir: str, tokenizer):
    """(prompt batches, PPO-ptx batches or None, eval prompt sets or None) of this process.

    Prompt batches hold prompts_per_iteration / process_count left-padded prompts of this
    process's shard ({"tokens", "mask"} int32 [B_local, P]); the eval prompt sets
    (`workdirs.eval_prompt_sets`) are the same on every process.
    """
    ppo = s.ppo
    train_paths, eval_paths = workdirs.stage_data_paths(s.data, workdir, "prompts_train",
                                                        "prompts_eval")
    prompt_sources = dialogue_sources.build_prompt_source(
        train_paths, eval_paths, os.path.join(workdir, "data", "tfds"),
        eval_percent=s.data.eval_percent, skip_malformed=s.data.skip_malformed)
    prompt_len = ppo.hyper.prompt_len
    to_example = functools.partial(prompt_example, tokenizer=tokenizer,
                                   template=s.chat.template_for(tokenizer),
                                   max_prompt_len=prompt_len,
                                   max_turns=s.chat.max_turns,
                                   on_truncate=chat_encoding.TruncationLog(
                                       "ppo", f"ppo.max_prompt_len={prompt_len}",
                                       echo=common.is_main_process()))
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    prompt_batches = loaders.make_example_batches(
        prompt_sources["train"], to_example,
        batch_size=ppo.prompts_per_iteration // jax.process_count(), seed=s.seed,
        pad_example=None, **shard)
    ptx_batches = _ptx_batches(s, workdir, tokenizer, shard) if ppo.hyper.ptx_coef > 0 else None
    num_prompts = s.eval.num_prompts if s.eval is not None else 0
    return prompt_batches, ptx_batches, workdirs.eval_prompt_sets(s.data, num_prompts, workdir)


def _ptx_batches(s: settings.StageSettings, workdir: str, tokenizer, shard: dict):
    """Packed pretraining batches for the PPO-ptx term: ptx_batch_size / process_count rows
    of this process's shard per batch."""
    if s.ppo.ptx_data_path:
        train = jsonl.resolve_paths(s.ppo.ptx_data_path)
    else:
        train = [demo_corpus.write_demo_corpus(os.path.join(workdir, "data", "demo"),
                                               seed=s.data.demo_seed)["train"]]
    source = text_sources.build_text_source(train, None, os.path.join(workdir, "data", "tfds"))
    return loaders.make_lm_batches(source["train"], tokenizer, seq_len=s.data.seq_len,
                                   batch_size=s.ppo.ptx_batch_size // shard["shard_count"],
                                   seed=s.seed, **shard)
