"""Two CPU processes on localhost (jax.distributed, gloo) run the pretrain stage command (the
shared supervised loop) on one global mesh (data 2 x fsdp 2 over 2 devices per process).
Each process packs documents of its own shard, so their data positions differ. One run is
interrupted twice -- SIGTERM to process 1 only (both save at the same step and exit 0),
then SIGKILL of both after a later checkpoint -- and resumed each time; it must end with
exactly the parameters and metrics of an uninterrupted 2-process run, every checkpoint
holding each process's own position. Resuming it with 1 process is refused in one line."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import _multiprocess as mp
from instructjax.data import demo_corpus, tokenizer as tok_lib
from instructjax.train import checkpoint as ckpt_lib
from instructjax.train.metrics import read_metrics

STEPS = 40
CHECKPOINT_EVERY = 4
TIMING_KEYS = ("steps_per_sec", "tokens_per_sec")  # wall-clock, differ between runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """{"train", "eval", "tokenizer"} paths: a small demo corpus and a tokenizer trained on it
    (given to the stage, so the 2 processes do not both train one into the workdir)."""
    root = tmp_path_factory.mktemp("pretrain_data")
    paths = demo_corpus.write_demo_corpus(root / "corpus", seed=0, num_train_docs=400,
                                          num_eval_docs=20)
    tok = tok_lib.train_tokenizer([paths["train"]], str(root / "tok.model"), 512, seed=0)
    return {**paths, "tokenizer": tok.model_path}


def _args(corpus, workdir):
    return [f"--workdir={workdir}", "--config=configs/pretrain_tiny.py",
            f"--config.tokenizer.path={corpus['tokenizer']}",
            f"--config.data.path={corpus['train']}", f"--config.data.eval_path={corpus['eval']}",
            "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1",
            f"--config.train.steps={STEPS}", "--config.train.batch_size=16",
            "--config.train.warmup_steps=4", "--config.train.log_every=1",
            "--config.train.eval_every=10", "--config.train.eval_batches=1",
            f"--config.train.checkpoint_every={CHECKPOINT_EVERY}",
            "--config.train.async_checkpoint=False"]


def _launch(corpus, workdir, logdir, tag):
    return mp.launch_experiment(_args(corpus, workdir), logdir, tag)


def _resume_with_one_process(corpus, workdir):
    """Runs the stage command as a single process (2 devices) on `workdir`."""
    args = [a.replace("mesh.fsdp=2", "mesh.fsdp=1") for a in _args(corpus, workdir)]
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=mp.REPO,
                          env=mp.child_env(), capture_output=True, text=True,
                          timeout=mp.PROCESS_TIMEOUT)


def _saved_steps(workdir):
    return ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()


def _without_timing(row):
    return {k: v for k, v in row.items() if k not in TIMING_KEYS}


def _assert_own_positions(workdir, step):
    """Checkpoint `step` holds one data position per process, each of its own shard."""
    meta = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).restore_meta(step)
    states = meta["data_states"]
    assert [s["config"]["shard_index"] for s in states] == [0, 1], meta
    assert states[0]["documents"] != states[1]["documents"] or (
        states[0]["chunk"] != states[1]["chunk"]), states  # distinct shards, distinct places


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_two_process_pretrain_resumes_after_sigterm_and_sigkill_to_the_same_result(corpus,
                                                                                 tmp_path):
    logs = tmp_path / "logs"
    logs.mkdir()
    t_start = time.monotonic()

    full = str(tmp_path / "full")
    procs = _launch(corpus, full, logs, "full")
    mp.checked(procs, mp.wait(procs))
    t_full = time.monotonic() - t_start

    # 1: SIGTERM to process 1 only once step 1 is logged; JAX's preemption sync point makes
    # both save at the same step and exit 0.
    run = str(tmp_path / "run")
    procs = _launch(corpus, run, logs, "term")
    mp.wait_for_step(procs, run, 1)
    procs[1][0].send_signal(signal.SIGTERM)
    mp.checked(procs, mp.wait(procs))
    assert "SIGTERM: saved step" in mp.read(procs[0][1]), mp.read(procs[0][1])[-3000:]
    stopped = max(mp.train_steps(run))
    assert 1 <= stopped <= STEPS - 3 * CHECKPOINT_EVERY, stopped
    assert _saved_steps(run)[-1] == stopped
    _assert_own_positions(run, stopped)
    assert "[pretrain]" not in mp.read(procs[1][1])  # only process 0 reports

    # Resuming with 1 process is refused in one line naming both counts; nothing is touched.
    rows_before = mp.read(os.path.join(run, "metrics.jsonl"))
    one = _resume_with_one_process(corpus, run)
    assert one.returncode == 1, one.stdout[-3000:] + one.stderr[-3000:]
    assert ("error: the checkpoint holds data positions of 2 process(es), but 1 are resuming"
            in one.stderr), one.stderr[-3000:]
    assert "Traceback" not in one.stderr, one.stderr[-3000:]
    assert _saved_steps(run)[-1] == stopped
    assert mp.read(os.path.join(run, "metrics.jsonl")) == rows_before

    # 2: resume; SIGKILL both once the step after the next checkpoint is logged (saves are
    # synchronous, so that checkpoint is committed).
    procs = _launch(corpus, run, logs, "kill")
    next_ckpt = (stopped // CHECKPOINT_EVERY + 1) * CHECKPOINT_EVERY
    mp.wait_for_step(procs, run, next_ckpt + 1)
    for proc, _ in procs:
        proc.send_signal(signal.SIGKILL)
    mp.wait(procs)
    assert f"resuming from step {stopped}" in mp.read(procs[0][1])
    killed_at = _saved_steps(run)[-1]  # a step or two may pass between the poll and the kill
    assert next_ckpt <= killed_at < STEPS, (next_ckpt, killed_at)
    _assert_own_positions(run, killed_at)

    # 3: resume to the end.
    procs = _launch(corpus, run, logs, "final")
    mp.checked(procs, mp.wait(procs))
    assert f"resuming from step {killed_at}" in mp.read(procs[0][1])
    print(f"2-process pretrain: uninterrupted run {t_full:.0f} s, "
          f"whole test {time.monotonic() - t_start:.0f} s (SIGTERM at {stopped}, "
          f"SIGKILL after {killed_at})")

    want, got = read_metrics(full), read_metrics(run)
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for g, w in zip(got, want):
        assert _without_timing(g) == _without_timing(w), (g["step"], g["split"])
    final = mp.restore_params(run)
    jax.tree.map(np.testing.assert_array_equal, final, mp.restore_params(full))
