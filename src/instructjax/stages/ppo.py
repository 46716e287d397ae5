"""Stage 3: PPO RLHF -- rollout, reference, reward, advantages, updates, log -- in named phases.

The policy starts from the SFT stage (`config.init_from`), the frozen reference is a copy of
it, and the reward model and its score statistics come from `config.ppo.reward_from`.
One iteration: sample responses to a batch of prompts with the KV-cache rollout engine, compute
old log-probs / values / reference log-probs / scores ONCE, build advantages, then run
`ppo.epochs` passes of minibatch updates over that frozen buffer.

Multi-host: every process runs this same function (after `common.initialize_distributed`).
Each reads its own shard of the prompts (and PPO-ptx text), which are assembled into global
arrays on the mesh; rollout, forwards and updates run sharded over all devices; metrics and
eval answers are reduced or gathered on device so every process sees the same numbers;
only process 0 writes logs and run records; orbax saves and restores from every process;
SIGTERM (or JAX's preemption notice) stops all processes after the same iteration.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from instructjax.data import (chat_encoding, demo, dialogue_sources, formats, jsonl, pipeline,
                              tfds_builders)
from instructjax.eval import true_score as true_score_lib
from instructjax.model.heads import RewardModel, ScalarHead
from instructjax.parallel import mesh as mesh_lib
from instructjax.model.transformer import Transformer
from instructjax.rlhf import actor_critic as ac
from instructjax.rlhf import experience as exp_lib
from instructjax.rlhf import kl as kl_lib
from instructjax.rlhf import rollout
from instructjax.stages import common, reward, sft
from instructjax.train import checkpoint as ckpt_lib
from instructjax.train import host_state
from instructjax.train import metrics as metrics_lib
from instructjax.train import divergence, optim, preemption as preemption_lib
from instructjax.train import state as state_lib
from instructjax.train.losses import lm_loss_fn


# ------------------------------------------------------------------------------ setup

def hyper(config: Any) -> exp_lib.PPOHyper:
    """PPOHyper from config.ppo."""
    p = config.ppo
    return exp_lib.PPOHyper(
        prompt_len=int(p.max_prompt_len), temperature=float(p.temperature), gamma=float(p.gamma),
        lam=float(p.lam), clip_eps=float(p.clip_eps), value_clip_eps=float(p.value_clip_eps),
        vf_coef=float(p.vf_coef), entropy_coef=float(p.entropy_coef),
        whiten_advantages=bool(p.whiten_advantages), kl_estimator=str(p.kl_estimator),
        reward_clip=float(p.reward_clip),
        missing_eos_penalty=float(p.missing_eos_penalty) if p.penalize_missing_eos else None,
        ptx_coef=float(p.ptx_coef), chunk=int(p.minibatch_size))


def check_sizes(config: Any, num_processes: int = 1, batch_shards: int = 1) -> tuple[int, int]:
    """(rollout batch B = prompts x samples, minibatches per epoch), validated.

    Args:
        config: the stage config.
        num_processes: processes that each read prompts_per_iteration / num_processes
            prompts (and ptx_batch_size / num_processes PPO-ptx rows).
        batch_shards: devices the batch dim is split over (mesh data x fsdp); prompts and
            minibatches must divide over them.
    """
    p = config.ppo
    batch = int(p.prompts_per_iteration) * int(p.num_samples)
    if batch % int(p.minibatch_size):
        raise common.StageError(
            f"ppo.prompts_per_iteration x ppo.num_samples = {batch} must be a multiple of "
            f"ppo.minibatch_size = {p.minibatch_size}")
    for key, rows in (("prompts_per_iteration", int(p.prompts_per_iteration)),
                      ("minibatch_size", int(p.minibatch_size))):
        if rows % batch_shards:
            raise common.StageError(f"ppo.{key}={rows} must divide over the mesh's batch "
                                    f"axes data x fsdp = {batch_shards} devices")
    if int(p.prompts_per_iteration) % num_processes:
        raise common.StageError(f"ppo.prompts_per_iteration={p.prompts_per_iteration} must "
                                f"divide over {num_processes} processes")
    if float(p.ptx_coef) > 0 and int(p.ptx_batch_size) % (num_processes * batch_shards):
        raise common.StageError(f"ppo.ptx_batch_size={p.ptx_batch_size} must divide over "
                                f"{num_processes} processes and {batch_shards} batch shards")
    if p.rollout_weights not in ROLLOUT_WEIGHTS:
        raise common.StageError(f"ppo.rollout_weights={p.rollout_weights!r}; valid: "
                                f"{ROLLOUT_WEIGHTS}")
    if p.critic not in ac.CRITICS:
        raise common.StageError(f"ppo.critic={p.critic!r}; valid: {ac.CRITICS}")
    return batch, batch // int(p.minibatch_size)


ROLLOUT_WEIGHTS = ("train", "gathered")


def make_rollout_params(config: Any, policy_cfg, param_shardings) -> Any:
    """params -> the policy weights the rollout decodes from (`ppo.rollout_weights`).

    param_shardings: NamedShardings of the actor-critic params (the training state's).
    """
    if config.ppo.rollout_weights == "gathered":
        copy = mesh_lib.make_decoding_copy(ac.policy_params(param_shardings), policy_cfg.dtype)
        return lambda params: copy(ac.policy_params(params))
    return ac.policy_params


def make_tx(config: Any, total_updates: int) -> optax.GradientTransformation:
    """AdamW for the policy (+ value head); a separate critic gets its own learning rate."""
    opt = optim.OptimConfig.from_train_config({**config.train.to_dict(), "steps": total_updates})
    actor_tx = optim.make_optimizer(opt)
    if config.ppo.critic == "shared":
        return actor_tx
    critic_opt = optim.OptimConfig.from_train_config(
        {**config.train.to_dict(), "steps": total_updates,
         "learning_rate": float(config.ppo.critic_learning_rate)})
    return optax.multi_transform({"actor": actor_tx, "critic": optim.make_optimizer(critic_opt)},
                                 lambda params: {name: name for name in params})


def load_reward_model(reward_dir: str, config: Any, mesh):
    """(RewardModel, params placed on mesh, score stats) of a finished reward stage."""
    info = common.read_run_info(reward_dir)
    if info.get("stage") != "reward":
        raise common.StageError(f"ppo.reward_from={reward_dir!r} is a {info.get('stage')!r} "
                                "stage, not a reward stage")
    rm = RewardModel(common.model_config_from(info, config))
    abstract, shardings = common.logical_shardings(
        lambda rng: rm.init(rng, jnp.zeros((1, 8), jnp.int32))["params"], mesh)
    params = ckpt_lib.load_params(reward_dir, ckpt_lib.abstract_with_shardings(abstract, shardings))
    stats_path = os.path.join(reward_dir, reward.REWARD_STATS)
    if not os.path.exists(stats_path):
        raise common.StageError(f"{stats_path} is missing: the reward stage did not finish")
    with open(stats_path, encoding="utf-8") as f:
        stats = json.load(f)
    return rm, params, stats


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
    tokens, mask = pipeline.left_pad([ids], tokenizer.pad_id, max_prompt_len)
    return {"tokens": tokens[0], "mask": mask[0]}


# ------------------------------------------------------------------------------ the stage

def run(config: Any, workdir: str) -> dict:
    """Runs (or resumes, or skips if finished) PPO in `workdir`; returns the last metrics."""
    os.makedirs(workdir, exist_ok=True)
    common.check_resume_config(config, workdir)  # before anything in workdir changes
    is_main = common.is_main_process()
    _, policy_cfg, tokenizer = common.init_from_stage(config, workdir, ("sft",))
    if not config.ppo.reward_from:
        raise common.StageError("config.ppo.reward_from is empty: point it at a finished "
                                "reward stage directory")
    iterations = int(config.train.steps)
    epochs = int(config.ppo.epochs)
    mesh = common.build_mesh(config)
    rollout_batch, minibatches = check_sizes(config, jax.process_count(),
                                             mesh_lib.batch_axis_size(mesh))
    hp = hyper(config)
    template = sft.chat_template(config)

    # -- models: policy (+ value), frozen reference, frozen reward model
    rm, rm_params, rm_stats = load_reward_model(config.ppo.reward_from, config, mesh)
    model = ac.make_actor_critic(str(config.ppo.critic), policy_cfg, rm.cfg)
    ref_model = Transformer(policy_cfg)
    sft_params = common.load_transformer_params(config.init_from, policy_cfg, mesh)
    ref_params = cast_frozen(sft_params, str(config.ppo.frozen_dtype))
    rm_params = cast_frozen(rm_params, str(config.ppo.frozen_dtype))
    gain = 1.0 / max(rm_stats["std"], 1e-6)
    bias = -rm_stats["mean"] * gain

    def init_boxed(rng):
        return model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]

    def initial_params():
        if config.ppo.critic == "shared":  # zero-initialised value head (OpenAI)
            head = ScalarHead(0.0).init(jax.random.key(0), jnp.zeros((1, 1, policy_cfg.embed_dim)))
            return {"trunk": sft_params, "value_head": nn.meta.unbox(head["params"])}
        return {"actor": sft_params, "critic": ac.critic_from_reward_model(rm_params, gain, bias)}

    tx = make_tx(config, iterations * epochs * minibatches)
    abstract, shardings = state_lib.state_shardings(init_boxed, tx, mesh)

    # -- data: prompts (and pretraining text for PPO-ptx); files written by process 0 first
    prompt_batches, ptx_batches, eval_sets = common.main_process_first(
        lambda: _data(config, workdir, tokenizer, template, hp), "ppo-data")

    # -- state: resume, or start from SFT
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=int(config.train.keep_checkpoints),
                                         async_save=bool(config.train.async_checkpoint))
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    # Both are closed on every way out, an exception included: pending asynchronous
    # saves are committed and the TensorBoard events flushed.
    with checkpointer, writer:
        kl_cfg = kl_lib.KLControllerConfig(kind=str(config.ppo.kl_controller),
                                           init_coef=float(config.ppo.init_kl_coef),
                                           target=float(config.ppo.kl_target),
                                           horizon=float(config.ppo.kl_horizon))
        restored = checkpointer.restore_latest(
            ckpt_lib.abstract_with_shardings(abstract, shardings))
        if restored is not None:
            state, meta, start = restored
            if meta.get("finished") and start >= iterations:
                if is_main:
                    print(f"[ppo] already finished at iteration {start} ({workdir}); nothing to do",
                          flush=True)
                if not os.path.isdir(os.path.join(workdir, ckpt_lib.PARAMS_DIR)):
                    # killed between the final checkpoint and the export, as the loop handles it
                    ckpt_lib.export_params(workdir, ac.policy_params(state.params))
                return {}
            if meta.get("process_count", 1) != jax.process_count():
                raise common.StageError(
                    f"{workdir} was checkpointed by {meta.get('process_count', 1)} process(es); "
                    f"resume it with the same number (now {jax.process_count()}): each process's "
                    "data position belongs to its own shard")
            prompt_batches.set_state(
                host_state.state_from_meta(meta, "prompt_states", legacy_key="prompt_state"))
            if ptx_batches is not None:
                ptx_batches.set_state(
                    host_state.state_from_meta(meta, "ptx_states", legacy_key="ptx_state"))
            kl_state = kl_lib.KLControllerState(kl_coef=jnp.float32(meta["kl_coef"]))
            writer.truncate_after(start)
            bad_steps = int(meta.get("bad_steps", 0))
            if is_main:
                print(f"[ppo] resuming from iteration {start}", flush=True)
        else:
            state = state_lib.create_state(init_boxed, tx, shardings, int(config.seed),
                                           initial_params())
            kl_state = kl_lib.init_controller(kl_cfg)
            start, bad_steps = 0, 0
            writer.start_fresh()  # rows of an earlier attempt are kept aside
        guard = divergence.BadStepGuard("ppo", int(config.train.max_bad_steps), bad_steps)
        last_saved = start if restored is not None else None
        common.write_run_info(workdir, "ppo", policy_cfg,
                              {"reward_from": os.path.abspath(config.ppo.reward_from)})

        # -- jitted phases
        policy_forward = exp_lib.make_policy_forward(model, hp)
        reference_forward = exp_lib.make_reference_forward(ref_model, hp)
        reward_forward = exp_lib.make_reward_forward(rm, hp)
        advantages_fn = exp_lib.make_advantages(hp)
        policy_model = Transformer(policy_cfg)  # the policy's trunk alone, for sampling
        rollout_params = make_rollout_params(config, policy_cfg, shardings.params)
        ptx_loss = lm_loss_fn(policy_model) if ptx_batches is not None else None
        update = exp_lib.make_update(model, tx, hp, ptx_loss)
        frozen_before = frozen_checksums(ref_params, rm_params)

        def evaluate(iteration):
            if not eval_sets:
                return {}
            result = true_score_lib.evaluate_sets(
                ac.policy_params(state.params), iteration, model=policy_model, tokenizer=tokenizer,
                template=template, prompt_sets=eval_sets, eval_cfg=config.eval,
                max_turns=int(config.chat.max_turns), seed=int(config.seed), mesh=mesh)
            writer.write(iteration, "eval", result)
            if is_main:
                print(f"[ppo] eval @ {iteration}: true_score {result['true_score']:.3f} "
                      f"(sampled {result['true_score_sampled']:.3f}, eos {result['eos_rate']:.2f}); "
                      f"held-out problems {result['heldout_true_score']:.3f} "
                      f"(sampled {result['heldout_true_score_sampled']:.3f})", flush=True)
            return result

        if start == 0:
            evaluate(0)
        rng = jax.random.fold_in(jax.random.key(int(config.seed)), 7)
        progress = metrics_lib.Progress(iterations, start, enabled=is_main, stage="ppo")
        last, done = {}, start
        with preemption_lib.Preemption() as preemption, mesh_lib.activate(mesh):
            for iteration in range(start, iterations):
                it_rng = jax.random.fold_in(rng, iteration)
                gen_rng, shuffle_rng = jax.random.split(it_rng)
                timings = {}

                # -- phase: rollout
                t0 = time.perf_counter()
                position = {"iteration": iteration, "prompt_state": prompt_batches.get_state()}
                prompts = pipeline.make_global_batch(next(prompt_batches), mesh)
                out = rollout.generate(
                    policy_model, rollout_params(state.params), prompts["tokens"], prompts["mask"],
                    gen_rng, max_new_tokens=int(config.ppo.max_new_tokens),
                    temperature=hp.temperature, top_k=int(config.ppo.top_k),
                    top_p=float(config.ppo.top_p), greedy=False, eos_id=tokenizer.eos_id,
                    pad_id=tokenizer.pad_id, num_samples=int(config.ppo.num_samples))
                jax.block_until_ready(out.tokens)
                timings["time_generation"] = time.perf_counter() - t0

                # -- phase: old log-probs and values (policy), reference, reward
                t0 = time.perf_counter()
                old_logprobs, old_values, entropy = jax.block_until_ready(
                    policy_forward(state.params, out.tokens, out.mask))
                timings["time_policy_forward"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                ref_logprobs = jax.block_until_ready(
                    reference_forward(ref_params, out.tokens, out.mask))
                timings["time_reference"] = time.perf_counter() - t0
                t0 = time.perf_counter()
                raw_scores = jax.block_until_ready(reward_forward(rm_params, out.tokens, out.mask))
                timings["time_reward"] = time.perf_counter() - t0

                # -- phase: advantages (once per rollout batch)
                experience, exp_stats = advantages_fn(
                    out.tokens, out.mask, out.response_mask, out.ended, old_logprobs, old_values,
                    ref_logprobs, raw_scores, kl_state.kl_coef, gain, bias)
                exp_stats = {k: float(v) for k, v in jax.device_get(exp_stats).items()}
                # a non-finite reward or KL poisons every advantage: no update this iteration
                bad_rollout = guard.record_and_check(
                    writer, "diverged", iteration + 1, exp_stats, position=position,
                    last_checkpoint=last_saved, unit="iteration")

                # -- phase: E epochs x M minibatches over the frozen buffer
                t0 = time.perf_counter()
                update_stats = []
                bad_minibatches = 0
                for epoch in range(epochs if not bad_rollout else 0):
                    # computed alike on every process, passed to `take` as a host array
                    order = np.asarray(jax.random.permutation(
                        jax.random.fold_in(shuffle_rng, epoch), rollout_batch))
                    for m in range(minibatches):
                        index = order[m * hp.chunk:(m + 1) * hp.chunk]
                        ptx_batch = (pipeline.make_global_batch(next(ptx_batches), mesh)
                                     if ptx_batches is not None else None)
                        state, stats = update(state, exp_lib.take(experience, index), ptx_batch)
                        # One update in flight at a time: CPU gloo collectives were seen to
                        # deadlock with dozens of queued cross-process programs; on accelerators
                        # the next update waits for this one's params anyway.
                        stats = {k: float(v) for k, v in jax.device_get(stats).items()}
                        update_stats.append(stats)
                        if divergence.nonfinite_names(stats):  # not applied (update guards it)
                            bad_minibatches += 1
                            if bad_minibatches == 1:  # counts once per iteration
                                guard.record_and_check(
                                    writer, "diverged", iteration + 1, stats,
                                    position={**position, "epoch": epoch, "minibatch": m},
                                    last_checkpoint=last_saved, unit="iteration")
                timings["time_training"] = time.perf_counter() - t0

                # -- phase: KL controller, metrics, eval, checkpoint
                kl_coef_used = kl_state.kl_coef
                if not bad_rollout:  # a NaN KL would stick in the adaptive coefficient
                    kl_state = kl_lib.update_controller(kl_cfg, kl_state,
                                                        jnp.float32(exp_stats["kl"]), rollout_batch)
                # reduced on device: the rows may live on other processes
                rollout_row = {k: float(v) for k, v in jax.device_get(
                    exp_lib.rollout_stats(entropy, out.response_mask, out.ended)).items()}
                response_tokens = rollout_row.pop("response_tokens")
                row = {**exp_stats, **timings, **rollout_row, **update_means(update_stats),
                       "kl_coef": float(jax.device_get(kl_coef_used)),  # beta of this iteration
                       "rollout_tokens_per_sec": response_tokens / max(timings["time_generation"], 1e-9),
                       "skipped_steps": guard.bad_steps, "skipped_minibatches": bad_minibatches}
                done = iteration + 1
                writer.write(done, "train", row)
                progress.report(done, {k: row[k] for k in ("loss", "score", "kl") if k in row})
                last = row
                if done % int(config.train.eval_every) == 0 or done == iterations:
                    last = {**last, **evaluate(done)}
                finished = done == iterations
                stop = preemption.should_stop(done)  # the same answer on every process
                if finished or done % int(config.train.checkpoint_every) == 0 or stop:
                    # Every process's own iterator positions (orbax writes the JSON from
                    # process 0; the packed ptx streams differ per shard). A collective: every
                    # process saves at this iteration.
                    prompt_states = host_state.gather_process_states(prompt_batches.get_state())
                    ptx_states = (host_state.gather_process_states(ptx_batches.get_state())
                                  if ptx_batches is not None else None)
                    meta = {"prompt_states": prompt_states, "finished": finished,
                            "kl_coef": float(jax.device_get(kl_state.kl_coef)), "stage": "ppo",
                            "ptx_states": ptx_states,
                            "process_count": jax.process_count(), "bad_steps": guard.bad_steps}
                    checkpointer.save(done, state, meta)
                    last_saved = done
                if stop and not finished:
                    if is_main:
                        print(f"[ppo] SIGTERM: saved iteration {done}, exiting", flush=True)
                    break
    frozen_after = frozen_checksums(ref_params, rm_params)
    if frozen_after != frozen_before:  # e.g. a donated or aliased buffer: never silently
        raise RuntimeError(f"frozen models changed during PPO: {frozen_before} -> {frozen_after}")
    if done == iterations:
        ckpt_lib.export_params(workdir, ac.policy_params(state.params))
    return {**last, "frozen_checksums": frozen_after}


def _data(config: Any, workdir: str, tokenizer, template, hp: exp_lib.PPOHyper):
    """(prompt batches, PPO-ptx batches or None, eval prompt sets or None) of this process.

    Prompt batches hold prompts_per_iteration / process_count left-padded prompts of this
    process's shard ({"tokens", "mask"} int32 [B_local, P]); the eval prompt sets
    (`sft.eval_prompt_sets`) are the same on every process.
    """
    train_paths, eval_paths = common.stage_data_paths(config, workdir, "prompts_train",
                                                      "prompts_eval")
    prompt_sources = dialogue_sources.build_prompt_source(
        train_paths, eval_paths, os.path.join(workdir, "data", "tfds"),
        eval_percent=int(config.data.eval_percent))
    to_example = functools.partial(prompt_example, tokenizer=tokenizer, template=template,
                                   max_prompt_len=hp.prompt_len,
                                   max_turns=int(config.chat.max_turns),
                                   on_truncate=chat_encoding.TruncationLog(
                                       "ppo", f"ppo.max_prompt_len={hp.prompt_len}",
                                       echo=common.is_main_process()))
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    prompt_batches = pipeline.make_example_batches(
        prompt_sources["train"], to_example,
        batch_size=int(config.ppo.prompts_per_iteration) // jax.process_count(),
        seed=int(config.seed), pad_example=None, **shard)
    ptx_batches = _ptx_batches(config, workdir, tokenizer, shard) if hp.ptx_coef > 0 else None
    return prompt_batches, ptx_batches, sft.eval_prompt_sets(config, workdir)


def _ptx_batches(config: Any, workdir: str, tokenizer, shard: dict):
    """Packed pretraining batches for the PPO-ptx term: ptx_batch_size / process_count rows
    of this process's shard per batch."""
    if config.ppo.ptx_data_path:
        train = jsonl.resolve_paths(config.ppo.ptx_data_path)
    else:
        train = [demo.write_demo_corpus(os.path.join(workdir, "data", "demo"),
                                                 seed=int(config.data.demo_seed))["train"]]
    source = tfds_builders.build_text_source(train, None, os.path.join(workdir, "data", "tfds"))
    return pipeline.make_lm_batches(source["train"], tokenizer, seq_len=int(config.data.seq_len),
                                    batch_size=int(config.ppo.ptx_batch_size) // shard["shard_count"],
                                    seed=int(config.seed), **shard)
