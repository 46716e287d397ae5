"""Two CPU processes on localhost (jax.distributed, gloo) run the PPO stage command on one
global mesh (data 2 x tensor 2 over 2 devices per process). One run is interrupted twice --
SIGTERM to process 1 only (JAX's preemption sync point makes both save at the same
iteration and exit 0), then SIGKILL of both right after a checkpoint -- and resumed each
time; it must end with exactly the parameters and metrics of an uninterrupted 2-process run.
Only process 0 writes logs."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from instructjax.train import checkpoint as ckpt_lib
from instructjax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8
PROCESS_TIMEOUT = 900  # seconds for one launch of both processes (2 shared cores)


@pytest.fixture(scope="module")
def stage_dirs(tmp_path_factory, random_sft_and_reward):
    """Random tiny SFT and reward stage directories (2 heads = 2 kv heads: tensor axis 2)."""
    root = tmp_path_factory.mktemp("stages")
    random_sft_and_reward(root, num_kv_heads=2)
    return root


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(root, workdir, logdir, tag):
    """Starts both processes of one run; returns [(Popen, log path)] for process 0, 1."""
    port = _free_port()
    args = [f"--workdir={workdir}", "--config=configs/ppo_tiny.py",
            f"--config.init_from={root / 'sft'}", f"--config.ppo.reward_from={root / 'reward'}",
            "--config.distributed.enabled=True",
            f"--config.distributed.coordinator_address=127.0.0.1:{port}",
            "--config.distributed.num_processes=2",
            "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.tensor=2",
            "--config.ppo.prompts_per_iteration=8", "--config.ppo.num_samples=2",
            "--config.ppo.minibatch_size=8", "--config.ppo.epochs=1",
            "--config.ppo.max_prompt_len=48", "--config.ppo.max_new_tokens=8",
            "--config.eval.num_prompts=8", "--config.eval.batch_size=8",
            "--config.eval.max_prompt_len=48", "--config.eval.max_new_tokens=8",
            f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=2",
            "--config.train.eval_every=3", "--config.train.async_checkpoint=False",
            "--config.train.learning_rate=3e-3"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    procs = []
    for i in range(2):
        log = os.path.join(logdir, f"{tag}.p{i}.log")
        with open(log, "w") as f:
            procs.append((subprocess.Popen(
                [sys.executable, "-m", "experiments.run", *args,
                 f"--config.distributed.process_id={i}"],
                cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT), log))
    return procs


def _read(log):
    with open(log, encoding="utf-8", errors="replace") as f:
        return f.read()


def _wait(procs, timeout=PROCESS_TIMEOUT):
    """Return codes of both processes (killing both if either hangs)."""
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 1)))
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return codes


def _train_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [r["step"] for r in read_metrics(workdir) if r["split"] == "train"]


def _wait_for_step(procs, workdir, step, timeout=PROCESS_TIMEOUT):
    """Blocks until process 0 has logged train iteration `step` (both still running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(proc.poll() is not None for proc, _ in procs):
            raise AssertionError("a process ended early:\n" + "\n".join(
                _read(log)[-3000:] for _, log in procs))
        if step in _train_steps(workdir):
            return
        time.sleep(0.2)
    raise AssertionError(f"iteration {step} not logged within {timeout} s")


def _checked(procs, codes):
    assert codes == [0, 0], "\n".join(f"--- {log} (rc {c})\n{_read(log)[-4000:]}"
                                      for (_, log), c in zip(procs, codes))


def _restore_params(workdir):
    """The exported params (saved by 2 processes on 4 devices) onto this process's device."""
    from orbax import checkpoint as ocp
    path = os.path.join(workdir, ckpt_lib.PARAMS_DIR)
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    try:
        meta = checkpointer.metadata(path)
        meta = getattr(meta, "item_metadata", meta)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              meta)
        return checkpointer.restore(path, target)
    finally:
        checkpointer.close()


COMPARED = ("score_raw", "score", "kl", "kl_coef", "policy_loss", "value_loss", "loss",
            "entropy", "response_length", "eos_rate", "grad_norm", "first_minibatch_ratio")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_two_processes_resume_after_sigterm_and_sigkill_to_the_same_result(stage_dirs,
                                                                           tmp_path):
    root = stage_dirs
    logs = tmp_path / "logs"
    logs.mkdir()
    t_start = time.monotonic()

    # Uninterrupted reference run.
    full = str(tmp_path / "full")
    procs = _launch(root, full, logs, "full")
    _checked(procs, _wait(procs))
    t_full = time.monotonic() - t_start

    # Interrupted run, 1: SIGTERM to process 1 only, once iteration 1 is logged. JAX's
    # preemption service tells process 0; both save at the same iteration and exit 0.
    run = str(tmp_path / "run")
    procs = _launch(root, run, logs, "term")
    _wait_for_step(procs, run, 1)
    procs[1][0].send_signal(signal.SIGTERM)
    codes = _wait(procs)
    _checked(procs, codes)
    main_log = _read(procs[0][1])
    assert "SIGTERM: saved iteration" in main_log, main_log[-3000:]
    stopped = max(_train_steps(run))
    assert 1 <= stopped <= 4, stopped  # the sync point lands an iteration or two later
    saved = ckpt_lib.Checkpointer(os.path.join(run, "checkpoints")).all_steps()
    assert saved[-1] == stopped, (saved, stopped)
    # only process 0 prints progress and writes logs
    assert "[ppo]" not in _read(procs[1][1])

    # 2: resume; SIGKILL both processes once the iteration after the next checkpoint is
    # logged (that checkpoint is committed: saves are synchronous here).
    procs = _launch(root, run, logs, "kill")
    next_ckpt = (stopped // 2 + 1) * 2  # <= 6: two iterations of margin before the end
    _wait_for_step(procs, run, next_ckpt + 1)
    for proc, _ in procs:
        proc.send_signal(signal.SIGKILL)
    _wait(procs)
    assert f"resuming from iteration {stopped}" in _read(procs[0][1])

    # 3: resume to the end.
    procs = _launch(root, run, logs, "final")
    _checked(procs, _wait(procs))
    assert f"resuming from iteration {next_ckpt}" in _read(procs[0][1])
    t_total = time.monotonic() - t_start
    print(f"2-process PPO: uninterrupted run {t_full:.0f} s, whole test {t_total:.0f} s")

    # Same rows (each iteration exactly once) and the same numbers as the uninterrupted run.
    want = [r for r in read_metrics(full)]
    got = [r for r in read_metrics(run)]
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want]
    for g, w in zip(got, want):
        keys = COMPARED if g["split"] == "train" else ("true_score", "true_score_sampled",
                                                       "eos_rate", "sample")
        assert {k: g[k] for k in keys} == {k: w[k] for k in keys}, (g["step"], g["split"])
    final = _restore_params(run)
    jax.tree.map(np.testing.assert_array_equal, final, _restore_params(full))
    start = _restore_params(str(root / "sft"))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final),
                                                        jax.tree.leaves(start)))  # it trained
