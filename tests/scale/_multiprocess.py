"""Helpers for tests that run one stage as 2 CPU processes on localhost (jax.distributed,
gloo collectives): start both, wait for a logged step, interrupt, collect the results."""

import os
import socket
import subprocess
import sys
import time

import jax

from instructjax.train import checkpoint as ckpt_lib
from instructjax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_PROCESSES = 2
PROCESS_TIMEOUT = 900  # seconds for one launch of both processes (2 shared cores)


def free_port() -> int:
    """A TCP port free on localhost right now (for the JAX coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict:
    """Environment of a child process: CPU, 2 devices per process, the repo importable."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2",
               PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    return env


def spawn(argv_of, logdir, tag: str) -> list:
    """Starts `argv_of(process_id, port)` for each process, output to logdir/TAG.pI.log.

    Returns [(Popen, log path)] for process 0, 1.
    """
    port = free_port()
    procs = []
    for i in range(NUM_PROCESSES):
        log = os.path.join(logdir, f"{tag}.p{i}.log")
        with open(log, "w") as f:
            procs.append((subprocess.Popen(argv_of(i, port), cwd=REPO, env=child_env(),
                                           stdout=f, stderr=subprocess.STDOUT), log))
    return procs


def launch_experiment(args: list[str], logdir, tag: str) -> list:
    """Both processes of `python -m experiments.run ARGS` on one coordinator (see `spawn`)."""
    def argv_of(i, port):
        return [sys.executable, "-m", "experiments.run", *args,
                "--config.distributed.enabled=True",
                f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                f"--config.distributed.num_processes={NUM_PROCESSES}",
                f"--config.distributed.process_id={i}"]
    return spawn(argv_of, logdir, tag)


def read(log: str) -> str:
    with open(log, encoding="utf-8", errors="replace") as f:
        return f.read()


def wait(procs, timeout=PROCESS_TIMEOUT) -> list[int]:
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


def checked(procs, codes) -> None:
    """Asserts both exited 0, showing the tail of each log otherwise."""
    assert codes == [0] * len(procs), "\n".join(f"--- {log} (rc {c})\n{read(log)[-4000:]}"
                                                for (_, log), c in zip(procs, codes))


def train_steps(workdir: str) -> list[int]:
    """Steps of the train rows of workdir/metrics.jsonl so far."""
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return []
    return [r["step"] for r in read_metrics(workdir) if r["split"] == "train"]


def wait_for_step(procs, workdir: str, step: int, timeout=PROCESS_TIMEOUT) -> None:
    """Blocks until process 0 has logged train step `step` (both still running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(proc.poll() is not None for proc, _ in procs):
            raise AssertionError("a process ended early:\n" + "\n".join(
                read(log)[-3000:] for _, log in procs))
        if step in train_steps(workdir):
            return
        time.sleep(0.2)
    raise AssertionError(f"step {step} not logged within {timeout} s")


def restore_params(workdir: str):
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
