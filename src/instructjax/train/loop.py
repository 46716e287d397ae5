"""The one supervised training loop shared by pretrain, SFT and the reward model.

Top to bottom: optimiser -> sharded state (fresh, from an earlier stage, or resumed) ->
jitted steps -> loop of (batch, step, log, eval, checkpoint) -> final checkpoint.
Stages differ only in what they put into a `SupervisedTask`: data, loss and extra evals.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from instructjax.data import pipeline as data_pipeline
from instructjax.parallel import mesh as mesh_lib
from instructjax.train import checkpoint as ckpt_lib
from instructjax.train import divergence
from instructjax.train import host_state
from instructjax.train import metrics as metrics_lib
from instructjax.train import optim, state as state_lib, step as step_lib
from instructjax.train import preemption as preemption_lib


@dataclasses.dataclass
class SupervisedTask:
    """What a supervised stage plugs into the loop.

    init_params_boxed: rng -> params with logical-partitioning boxes (fresh init).
    loss_fn: (params, batch, rng) -> (loss_sum, weight, stats); see train/step.py.
    make_train_batches: () -> iterator of per-process numpy batches with get_state/set_state.
    make_eval_batches: () -> iterable of per-process numpy eval batches (finite), or None.
    load_initial_params: () -> params pytree to start from (an earlier stage), or None.
    extra_eval: (params, step) -> dict of extra eval metrics (e.g. true_score), or None.
    tokens_per_batch: tokens processed per global batch, for tokens/s.
    """
    name: str
    init_params_boxed: Callable[[jax.Array], Any]
    loss_fn: step_lib.LossFn
    make_train_batches: Callable[[], Iterator[dict]]
    make_eval_batches: Callable[[], Iterable[dict]] | None = None
    load_initial_params: Callable[[], Any] | None = None
    extra_eval: Callable[[Any, int], dict] | None = None
    tokens_per_batch: int = 0


@dataclasses.dataclass
class LoopResult:
    """How the loop ended: the final state and whether it stopped early (SIGTERM)."""
    state: state_lib.TrainState
    step: int
    finished: bool
    preempted: bool = False
    skipped: bool = False


def _evaluate(eval_step, params, eval_batches: list[dict], mesh: Mesh) -> dict:
    totals: dict[str, list[float]] = {}
    for host_batch in eval_batches:
        batch = data_pipeline.make_global_batch(host_batch, mesh)
        sums = jax.device_get(eval_step(params, batch))
        for name, (num, den) in sums.items():
            acc = totals.setdefault(name, [0.0, 0.0])
            acc[0] += float(num)
            acc[1] += float(den)
    result = {name: num / max(den, 1e-9) for name, (num, den) in totals.items()}
    if "loss" in result:
        result["perplexity"] = math.exp(min(result["loss"], 50.0))
    return result


def run_supervised(task: SupervisedTask, train_cfg: Any, mesh: Mesh, workdir: str, *,
                   seed: int) -> LoopResult:
    """Trains `task` for `train_cfg.steps` steps in `workdir`, resuming if it can.

    Writes `workdir/metrics.jsonl`, TensorBoard events and `workdir/checkpoints/`.
    """
    is_main = jax.process_index() == 0
    opt_cfg = optim.OptimConfig.from_train_config(train_cfg)
    schedule = optim.make_schedule(opt_cfg)
    tx = optim.make_optimizer(opt_cfg)
    total_steps = int(train_cfg.steps)

    abstract, shardings = state_lib.state_shardings(task.init_params_boxed, tx, mesh)
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=int(train_cfg.keep_checkpoints),
        async_save=bool(train_cfg.async_checkpoint))
    writer = metrics_lib.MetricsWriter(workdir, enabled=is_main)
    # Both are closed on every way out, an exception included: pending asynchronous
    # saves are committed and the TensorBoard events flushed.
    with checkpointer, writer:
        train_batches = task.make_train_batches()

        restored = checkpointer.restore_latest(
            ckpt_lib.abstract_with_shardings(abstract, shardings))
        if restored is not None:
            state, meta, start_step = restored
            if meta.get("finished") and start_step >= total_steps:
                if is_main:
                    print(f"[{task.name}] already finished at step {start_step} ({workdir}); "
                          "nothing to do", flush=True)
                if not os.path.isdir(os.path.join(workdir, ckpt_lib.PARAMS_DIR)):
                    ckpt_lib.export_params(workdir, state.params)  # killed before exporting
                return LoopResult(state, start_step, finished=True, skipped=True)
            train_batches.set_state(
                host_state.state_from_meta(meta, "data_states", legacy_key="data_state"))
            writer.truncate_after(start_step)
            bad_steps = int(meta.get("bad_steps", 0))
            if is_main:
                print(f"[{task.name}] resuming from step {start_step}", flush=True)
        else:
            initial = task.load_initial_params() if task.load_initial_params else None
            state = state_lib.create_state(task.init_params_boxed, tx, shardings, seed, initial)
            start_step, bad_steps = 0, 0
            writer.start_fresh()  # rows of an earlier attempt are kept aside
        guard = divergence.BadStepGuard(task.name, int(train_cfg.get("max_bad_steps", 0)),
                                        bad_steps)
        last_saved = start_step if restored is not None else None

        train_step = eval_step = None  # jitted on first use, when batch shapes are known
        eval_batches: list[dict] | None = None
        progress = metrics_lib.Progress(total_steps, start_step, enabled=is_main, stage=task.name)
        log_every = max(int(train_cfg.log_every), 1)
        last_log_time, last_log_step = time.perf_counter(), start_step

        def run_eval(params, step):
            nonlocal eval_batches, eval_step
            if task.make_eval_batches is None:
                return {}
            if eval_batches is None:  # the same held-out batches every time
                eval_batches = list(task.make_eval_batches())[: int(train_cfg.eval_batches)]
                eval_step = step_lib.jit_eval_step(
                    step_lib.make_eval_step(task.loss_fn), shardings.params, mesh,
                    _ndims_of(eval_batches[0]))
            with mesh_lib.activate(mesh):
                result = _evaluate(eval_step, params, eval_batches, mesh)
                if task.extra_eval is not None:
                    result.update(task.extra_eval(params, step))
            writer.write(step, "eval", result)
            if is_main:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items()
                                  if isinstance(v, (int, float)))
                print(f"[{task.name}] eval @ {step}: {shown}", flush=True)
            return result

        def settle(step_done: int, device_metrics: dict, position: dict) -> None:
            """Reads one step's metrics on the host: logs them, and skips or stops on a
            non-finite loss / gradient norm (the step itself already changed nothing)."""
            nonlocal last_log_time, last_log_step
            metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
            metrics["skipped_steps"] = guard.bad_steps
            skipped = guard.record_and_check(writer, "train", step_done, metrics,
                                             position=position, last_checkpoint=last_saved)
            if not skipped and (step_done % log_every == 0 or step_done == total_steps):
                now = time.perf_counter()
                rate = (step_done - last_log_step) / max(now - last_log_time, 1e-9)
                metrics["steps_per_sec"] = rate
                metrics["tokens_per_sec"] = rate * task.tokens_per_batch
                last_log_time, last_log_step = now, step_done
                writer.write(step_done, "train", metrics)
                progress.report(step_done, metrics)

        step = start_step
        if start_step == 0:
            run_eval(state.params, 0)
        preempted = False
        # A step's metrics are read one step late, while the device runs the next one, so the
        # host never waits for the device except at log, eval and checkpoint steps (which
        # settle first: nothing is evaluated or saved past an unread step). One step in
        # flight also suits CPU collectives across processes (30 queued programs were fine,
        # 100 hung).
        pending = None
        with preemption_lib.Preemption() as preemption:
            while step < total_steps:
                position = {"batch": step, "data_state": train_batches.get_state()}
                host_batch = next(train_batches)
                if train_step is None:
                    train_step = step_lib.jit_train_step(
                        step_lib.make_train_step(task.loss_fn, tx, schedule,
                                                 grad_accum_steps=int(train_cfg.grad_accum_steps)),
                        shardings, mesh, _ndims_of(host_batch))
                batch = data_pipeline.make_global_batch(host_batch, mesh)
                with mesh_lib.activate(mesh):
                    state, metrics = train_step(state, batch)
                step += 1
                if pending is not None:
                    settle(*pending)
                pending = (step, metrics, position)

                is_eval = step % int(train_cfg.eval_every) == 0 or step == total_steps
                is_checkpoint = step % int(train_cfg.checkpoint_every) == 0
                if step % log_every == 0 or is_eval or is_checkpoint or step == total_steps:
                    settle(*pending)
                    pending = None
                if is_eval:
                    run_eval(state.params, step)

                finished = step == total_steps
                stop = preemption.should_stop(step)  # the same answer on every process
                if finished or is_checkpoint or stop:
                    if pending is not None:
                        settle(*pending)
                        pending = None
                    # every process's own data position (a collective: all save this step)
                    data_states = host_state.gather_process_states(train_batches.get_state())
                    checkpointer.save(step, state, {"data_states": data_states,
                                                    "finished": finished, "stage": task.name,
                                                    "bad_steps": guard.bad_steps})
                    last_saved = step
                if stop and not finished:
                    preempted = True
                    if is_main:
                        print(f"[{task.name}] SIGTERM: saved step {step}, exiting", flush=True)
                    break
    if step == total_steps:
        ckpt_lib.export_params(workdir, state.params)
    return LoopResult(state, step, finished=step == total_steps, preempted=preempted)


def _ndims_of(batch: dict) -> dict:
    return {k: np.ndim(v) for k, v in batch.items()}
