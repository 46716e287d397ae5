"""What both training loops (supervised and PPO) do around their steps.

Resume or start, time named phases, decide when to save and stop, export at the end: one
copy, so the supervised loop (train/loop.py) and PPO (stages/ppo.py) cannot drift apart.
Like nanodo's restore helper and big_vision's timing helper: functions, not a trainer class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable, Iterator

import jax

from instructjax.train import checkpoint as ckpt_lib


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """The loop's schedule (converted once from `config.train`).

    Attributes:
        steps: what a loop counts to: optimiser steps in pretrain / SFT / reward, PPO
            iterations (one rollout batch, then epochs x minibatches updates) in PPO.
        eval_every, checkpoint_every: in those units; the last one always evaluates and saves.
        keep_checkpoints, async_checkpoint: orbax's retention and background saving.
        max_bad_steps: non-finite steps (or PPO iterations) skipped before the run stops.
        log_every: supervised steps between logged rows (PPO logs every iteration).
        eval_batches: held-out batches per supervised eval.
        grad_accum_steps: micro-batches per supervised step.
        seed: the run's seed (parameter init, data order, sampling).
    """
    steps: int
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    max_bad_steps: int = 0
    log_every: int = 1
    eval_batches: int = 8
    grad_accum_steps: int = 1
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a loop begins.

    state: the train state (restored or fresh); step: steps already done; meta: the restored
    checkpoint's metadata (None on a fresh start); finished: the run had already ended (the
    loop has nothing to do); bad_steps: skipped non-finite steps so far.
    """
    state: Any
    step: int
    meta: dict | None
    finished: bool = False
    bad_steps: int = 0


def say(name: str, message: str) -> None:
    """Prints `[name] message` on process 0 only."""
    if jax.process_index() == 0:
        print(f"[{name}] {message}", flush=True)


def resume_or_start(checkpointer: ckpt_lib.Checkpointer, writer, target: Any, total: int, *,
                    name: str, workdir: str, unit: str, fresh_state: Callable[[], Any],
                    export: Callable[[Any], None],
                    restore_positions: Callable[[dict], None]) -> Start:
    """Restores the newest checkpoint into `target` (abstract state with shardings), or starts.

    A run already finished at `total` is not trained again; if it was killed between its
    final checkpoint and its export, `export(state)` writes the params now. On a resume,
    `restore_positions(meta)` puts the data iterators where the checkpoint left them (and
    may refuse the resume, e.g. another process count) before anything is written; then
    the metric rows past the checkpoint are dropped. A fresh start keeps an earlier
    attempt's rows aside. `fresh_state()` is only called when there is nothing to restore.
    """
    restored = checkpointer.restore_latest(target)
    if restored is None:
        writer.start_fresh()
        return Start(fresh_state(), 0, None)
    state, meta, step = restored
    if meta.get("finished") and step >= total:
        say(name, f"already finished at {unit} {step} ({workdir}); nothing to do")
        if not os.path.isdir(os.path.join(workdir, ckpt_lib.PARAMS_DIR)):
            export(state)
        return Start(state, step, meta, finished=True)
    restore_positions(meta)
    writer.truncate_after(step)
    say(name, f"resuming from {unit} {step}")
    return Start(state, step, meta, bad_steps=int(meta.get("bad_steps", 0)))


class PhaseTimes:
    """Wall time of named phases: `with times("generation"): ...` records time_generation.

    The caller blocks on the phase's device results inside the block (dispatch is async).
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[f"time_{phase}"] = time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class SavePoint:
    """What happens after step `step`: save a checkpoint, stop (SIGTERM), or both."""
    save: bool
    stop: bool
    finished: bool


def save_point(preemption, step: int, cfg: LoopConfig) -> SavePoint:
    """Whether to save and whether to stop after `step` (a collective decision: the same on
    every process). The last step, every checkpoint_every-th and a preemption save."""
    finished = step == cfg.steps
    stop = preemption.should_stop(step) and not finished
    return SavePoint(save=finished or step % cfg.checkpoint_every == 0 or stop, stop=stop,
                     finished=finished)


def finish(workdir: str, step: int, cfg: LoopConfig, params: Any) -> bool:
    """Exports `params` to WORKDIR/params when the loop reached cfg.steps; returns whether."""
    if step != cfg.steps:
        return False
    ckpt_lib.export_params(workdir, params)
    return True
