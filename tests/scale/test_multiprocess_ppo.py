"""Two CPU processes on localhost (jax.distributed, gloo) run the PPO stage command on one
global mesh (data 2 x tensor 2 over 2 devices per process), without and with PPO-ptx (whose
packed pretraining batches differ per process: each packs its own shard). One run is
interrupted twice -- SIGTERM to process 1 only (JAX's preemption sync point makes both save
at the same iteration and exit 0), then SIGKILL of both right after a checkpoint -- and
resumed each time; it must end with exactly the parameters and metrics of an uninterrupted
2-process run. Only process 0 writes logs."""

import os
import signal
import time

import jax
import numpy as np
import pytest

import _multiprocess as mp
from instructjax.train import checkpoint as ckpt_lib
from instructjax.train.metrics import read_metrics

STEPS = 8
# PPO-ptx in short rows (the data: the small corpus the stage fixture wrote).
PTX_ARGS = ("--config.ppo.ptx_coef=0.5", "--config.ppo.ptx_batch_size=8",
            "--config.data.seq_len=32")


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory, random_sft_and_reward):
    """Random tiny SFT and reward stage directories (2 heads = 2 kv heads: tensor axis 2)."""
    root = tmp_path_factory.mktemp("stages")
    random_sft_and_reward(root, num_kv_heads=2)
    return root


def _launch(root, workdir, logdir, tag, extra_args=()):
    """Starts both processes of one run; returns [(Popen, log path)] for process 0, 1."""
    args = [f"--workdir={workdir}", "--config=configs/ppo_tiny.py",
            f"--config.init_from={root / 'sft'}", f"--config.ppo.reward_from={root / 'reward'}",
            "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=2",
            "--config.ppo.prompts_per_iteration=8", "--config.ppo.num_samples=2",
            "--config.ppo.minibatch_size=8", "--config.ppo.epochs=1",
            "--config.ppo.max_prompt_len=48", "--config.ppo.max_new_tokens=8",
            "--config.eval.num_prompts=8", "--config.eval.batch_size=8",
            "--config.eval.max_prompt_len=48", "--config.eval.max_new_tokens=8",
            f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=2",
            "--config.train.eval_every=3", "--config.train.async_checkpoint=False",
            "--config.train.learning_rate=3e-3", *extra_args]
    return mp.launch_experiment(args, logdir, tag)


def _assert_own_ptx_positions(workdir, step):
    """Checkpoint `step` holds one PPO-ptx data position per process, of its own shard (the
    packed streams differ), and the prompt positions of both processes."""
    meta = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).restore_meta(step)
    assert len(meta["prompt_states"]) == 2, meta
    ptx = meta["ptx_states"]
    assert [s["config"]["shard_index"] for s in ptx] == [0, 1], meta
    assert ptx[0]["documents"] != ptx[1]["documents"] or ptx[0]["chunk"] != ptx[1]["chunk"], ptx


COMPARED = ("score_raw", "score", "kl", "kl_coef", "policy_loss", "value_loss", "loss",
            "entropy", "response_length", "eos_rate", "grad_norm", "first_minibatch_ratio")


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("ptx", [False, True], ids=["prompts", "ptx"])
def test_two_processes_resume_after_sigterm_and_sigkill_to_the_same_result(stage_dirs,
                                                                           tmp_path, ptx):
    root = stage_dirs
    ptx_data = root / "corpus" / "demo_corpus_train.jsonl"  # written by the stage fixture
    extra = (*PTX_ARGS, f"--config.ppo.ptx_data_path={ptx_data}") if ptx else ()
    compared = COMPARED + ("ptx_loss",) if ptx else COMPARED
    logs = tmp_path / "logs"
    logs.mkdir()
    t_start = time.monotonic()

    # Uninterrupted reference run.
    full = str(tmp_path / "full")
    procs = _launch(root, full, logs, "full", extra)
    mp.checked(procs, mp.wait(procs))
    t_full = time.monotonic() - t_start

    # Interrupted run, 1: SIGTERM to process 1 only, once iteration 1 is logged. JAX's
    # preemption service tells process 0; both save at the same iteration and exit 0.
    run = str(tmp_path / "run")
    procs = _launch(root, run, logs, "term", extra)
    mp.wait_for_step(procs, run, 1)
    procs[1][0].send_signal(signal.SIGTERM)
    codes = mp.wait(procs)
    mp.checked(procs, codes)
    main_log = mp.read(procs[0][1])
    assert "SIGTERM: saved iteration" in main_log, main_log[-3000:]
    stopped = max(mp.train_steps(run))
    assert 1 <= stopped <= 4, stopped  # the sync point lands an iteration or two later
    saved = ckpt_lib.Checkpointer(os.path.join(run, "checkpoints")).all_steps()
    assert saved[-1] == stopped, (saved, stopped)
    # only process 0 prints progress and writes logs
    assert "[ppo]" not in mp.read(procs[1][1])
    if ptx:
        _assert_own_ptx_positions(run, stopped)

    # 2: resume; SIGKILL both processes once the iteration after the next checkpoint is
    # logged (that checkpoint is committed: saves are synchronous here).
    procs = _launch(root, run, logs, "kill", extra)
    next_ckpt = (stopped // 2 + 1) * 2  # <= 6: two iterations of margin before the end
    mp.wait_for_step(procs, run, next_ckpt + 1)
    for proc, _ in procs:
        proc.send_signal(signal.SIGKILL)
    mp.wait(procs)
    assert f"resuming from iteration {stopped}" in mp.read(procs[0][1])

    # 3: resume to the end.
    procs = _launch(root, run, logs, "final", extra)
    mp.checked(procs, mp.wait(procs))
    assert f"resuming from iteration {next_ckpt}" in mp.read(procs[0][1])
    t_total = time.monotonic() - t_start
    if ptx:
        _assert_own_ptx_positions(run, next_ckpt)
    print(f"2-process PPO{'-ptx' if ptx else ''}: uninterrupted run {t_full:.0f} s, "
          f"whole test {t_total:.0f} s")

    # Same rows (each iteration exactly once) and the same numbers as the uninterrupted run.
    want = [r for r in read_metrics(full)]
    got = [r for r in read_metrics(run)]
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for g, w in zip(got, want):
        keys = compared if g["split"] == "train" else ("true_score", "true_score_sampled",
                                                       "eos_rate", "sample")
        assert {k: g[k] for k in keys} == {k: w[k] for k in keys}, (g["step"], g["split"])
    final = mp.restore_params(run)
    jax.tree.map(np.testing.assert_array_equal, final, mp.restore_params(full))
    start = mp.restore_params(str(root / "sft"))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final),
                                                        jax.tree.leaves(start)))  # it trained
