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

from instructjax.parallel import mesh as mesh_lib
from instructjax.parallel.batch import make_global_batch
from instructjax.train import checkpoint as ckpt_lib
from instructjax.train import divergence, lifecycle
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


class _Evaluator:
    """Held-out loss / metrics of the task (+ its extra eval), logged under split "eval".

    The eval batches are read and the eval step compiled on first use; the same held-out
    batches are used every time.
    """

    def __init__(self, task: SupervisedTask, cfg: lifecycle.LoopConfig, param_shardings,
                 mesh: Mesh, writer: metrics_lib.MetricsWriter):
        self.task, self.cfg, self.param_shardings = task, cfg, param_shardings
        self.mesh, self.writer = mesh, writer
        self.batches: list[dict] | None = None
        self.step_fn = None

    def __call__(self, params, step: int) -> dict:
        if self.task.make_eval_batches is None:
            return {}
        if self.batches is None:
            self.batches = list(self.task.make_eval_batches())[: self.cfg.eval_batches]
            self.step_fn = step_lib.jit_eval_step(
                step_lib.make_eval_step(self.task.loss_fn), self.param_shardings, self.mesh,
                _ndims_of(self.batches[0]))
        with mesh_lib.activate(self.mesh):
            result = self._held_out(params)
            if self.task.extra_eval is not None:
                result.update(self.task.extra_eval(params, step))
        self.writer.write(step, "eval", result)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, (int, float)))
        lifecycle.say(self.task.name, f"eval @ {step}: {shown}")
        return result

    def _held_out(self, params) -> dict:
        totals: dict[str, list[float]] = {}
        for host_batch in self.batches:
            batch = make_global_batch(host_batch, self.mesh)
            sums = jax.device_get(self.step_fn(params, batch))
            for name, (num, den) in sums.items():
                acc = totals.setdefault(name, [0.0, 0.0])
                acc[0] += float(num)
                acc[1] += float(den)
        result = {name: num / max(den, 1e-9) for name, (num, den) in totals.items()}
        if "loss" in result:
            result["perplexity"] = math.exp(min(result["loss"], 50.0))
        return result


class _StepLog:
    """Reads a step's metrics on the host (one step late, see run_supervised), skips or stops
    on a non-finite loss / gradient norm (the step itself already changed nothing), and logs
    every log_every-th step with its rate."""

    def __init__(self, task: SupervisedTask, cfg: lifecycle.LoopConfig, writer, guard,
                 start_step: int, last_saved: int | None):
        self.task, self.cfg, self.writer, self.guard = task, cfg, writer, guard
        self.progress = metrics_lib.Progress(cfg.steps, start_step,
                                             enabled=jax.process_index() == 0, stage=task.name)
        self.last_time, self.last_step = time.perf_counter(), start_step
        self.last_saved = last_saved
        self.pending: tuple | None = None

    def push(self, step_done: int, device_metrics: dict, position: dict) -> None:
        """Holds this step's metrics and settles the previous step's."""
        self.settle()
        self.pending = (step_done, device_metrics, position)

    def settle(self) -> None:
        """Reads and logs the held step, if any (before eval, checkpoint and the end)."""
        if self.pending is None:
            return
        step_done, device_metrics, position = self.pending
        self.pending = None
        metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        metrics["skipped_steps"] = self.guard.bad_steps
        skipped = self.guard.record_and_check(self.writer, "train", step_done, metrics,
                                              position=position, last_checkpoint=self.last_saved)
        log_every = max(self.cfg.log_every, 1)
        if not skipped and (step_done % log_every == 0 or step_done == self.cfg.steps):
            now = time.perf_counter()
            rate = (step_done - self.last_step) / max(now - self.last_time, 1e-9)
            metrics["steps_per_sec"] = rate
            metrics["tokens_per_sec"] = rate * self.task.tokens_per_batch
            self.last_time, self.last_step = now, step_done
            self.writer.write(step_done, "train", metrics)
            self.progress.report(step_done, metrics)


def run_supervised(task: SupervisedTask, cfg: lifecycle.LoopConfig, opt_cfg: optim.OptimConfig,
                   mesh: Mesh, workdir: str) -> LoopResult:
    """Trains `task` for `cfg.steps` steps in `workdir`, resuming if it can.

    Writes `workdir/metrics.jsonl`, TensorBoard events and `workdir/checkpoints/`; exports
    the final params to `workdir/params/`.
    """
    tx = optim.make_optimizer(opt_cfg)
    abstract, shardings = state_lib.state_shardings(task.init_params_boxed, tx, mesh)
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                         max_to_keep=cfg.keep_checkpoints,
                                         async_save=cfg.async_checkpoint)
    writer = metrics_lib.MetricsWriter(workdir, enabled=jax.process_index() == 0)
    # Both are closed on every way out, an exception included: pending asynchronous
    # saves are committed and the TensorBoard events flushed.
    with checkpointer, writer:
        train_batches = task.make_train_batches()

        def fresh_state():
            initial = task.load_initial_params() if task.load_initial_params else None
            return state_lib.create_state(task.init_params_boxed, tx, shardings, cfg.seed,
                                          initial)

        start = lifecycle.resume_or_start(
            checkpointer, writer, ckpt_lib.abstract_with_shardings(abstract, shardings),
            cfg.steps, name=task.name, workdir=workdir, unit="step", fresh_state=fresh_state,
            export=lambda s: ckpt_lib.export_params(workdir, s.params),
            restore_positions=lambda meta: train_batches.set_state(
                host_state.state_from_meta(meta, "data_states", legacy_key="data_state")))
        if start.finished:
            return LoopResult(start.state, start.step, finished=True, skipped=True)
        guard = divergence.BadStepGuard(task.name, cfg.max_bad_steps, start.bad_steps)
        log = _StepLog(task, cfg, writer, guard, start.step,
                       start.step if start.meta is not None else None)
        evaluate = _Evaluator(task, cfg, shardings.params, mesh, writer)
        state, step = start.state, start.step
        if step == 0:
            evaluate(state.params, 0)
        train_step = None  # jitted on first use, when the batch shapes are known
        point = None
        # A step's metrics are read one step late, while the device runs the next one, so the
        # host never waits for the device except at log, eval and checkpoint steps (which
        # settle first: nothing is evaluated or saved past an unread step). One step in
        # flight also suits CPU collectives across processes (30 queued programs were fine,
        # 100 hung).
        with preemption_lib.Preemption() as preemption:
            while step < cfg.steps:
                position = {"batch": step, "data_state": train_batches.get_state()}
                host_batch = next(train_batches)
                if train_step is None:
                    train_step = step_lib.jit_train_step(
                        step_lib.make_train_step(task.loss_fn, tx, optim.make_schedule(opt_cfg),
                                                 grad_accum_steps=cfg.grad_accum_steps),
                        shardings, mesh, _ndims_of(host_batch))
                with mesh_lib.activate(mesh):
                    state, metrics = train_step(state,
                                                make_global_batch(host_batch, mesh))
                step += 1
                log.push(step, metrics, position)
                is_eval = step % cfg.eval_every == 0 or step == cfg.steps
                if step % max(cfg.log_every, 1) == 0 or is_eval or step % cfg.checkpoint_every == 0:
                    log.settle()
                if is_eval:
                    evaluate(state.params, step)
                point = lifecycle.save_point(preemption, step, cfg)
                if point.save:
                    log.settle()
                    # every process's own data position (a collective: all save this step)
                    data_states = host_state.gather_process_states(train_batches.get_state())
                    checkpointer.save(step, state, {"data_states": data_states,
                                                    "finished": point.finished,
                                                    "stage": task.name,
                                                    "bad_steps": guard.bad_steps})
                    log.last_saved = step
                if point.stop:
                    lifecycle.say(task.name, f"SIGTERM: saved step {step}, exiting")
                    break
    finished = lifecycle.finish(workdir, step, cfg, state.params)
    return LoopResult(state, step, finished=finished, preempted=bool(point and point.stop))


def _ndims_of(batch: dict) -> dict:
    return {k: np.ndim(v) for k, v in batch.items()}
