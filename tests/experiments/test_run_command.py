"""The user-facing command: config errors are one clear line; the tiny pretrain run learns;
SIGTERM checkpoints and exits 0; a finished stage is not retrained."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cmd(args, workdir, timeout=600):
    cmd = [sys.executable, "-m", "experiments.run", f"--workdir={workdir}", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def eval_rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if r["split"] == "eval"]


def test_misspelled_override_names_the_key(tmp_path):
    out = run_cmd(["--config=configs/pretrain_tiny.py", "--config.train.stpes=3"], tmp_path)
    assert out.returncode != 0
    assert "stpes" in out.stderr


def test_unknown_key_in_config_file_names_key_and_valid_ones(tmp_path):
    bad = tmp_path / "bad_config.py"
    bad.write_text("from configs import pretrain_tiny\n"
                   "def get_config():\n"
                   "    c = pretrain_tiny.get_config()\n"
                   "    c.train.learnig_rate = 0.1\n"
                   "    return c\n")
    out = run_cmd([f"--config={bad}"], tmp_path / "w")
    assert out.returncode == 1
    assert "train.learnig_rate" in out.stderr and "learning_rate" in out.stderr


def test_unknown_stage_names_valid_stages(tmp_path):
    out = run_cmd(["--config=configs/pretrain_tiny.py", "--config.stage=pretrian"], tmp_path)
    assert out.returncode == 1
    assert "pretrian" in out.stderr and "pretrain" in out.stderr


def test_missing_data_file_is_named(tmp_path):
    missing = tmp_path / "nope.jsonl"
    out = run_cmd(["--config=configs/pretrain_tiny.py", f"--config.data.path={missing}"],
                  tmp_path / "w")
    assert out.returncode == 1
    assert str(missing) in out.stderr
    assert "Traceback" not in out.stderr


def test_malformed_jsonl_line_is_named(tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "hello world"}\n{"text": "fine"}\n{"text": broken\n',
                    encoding="utf-8")
    out = run_cmd(["--config=configs/pretrain_tiny.py", f"--config.data.path={data}",
                   f"--config.data.eval_path={data}"], tmp_path / "w")
    assert out.returncode == 1
    assert f"{data}:3" in out.stderr


def test_pretrain_tiny_learns_then_skips_when_finished(tmp_path):
    workdir = tmp_path / "run"
    # the shipped config, shortened: the full 300-step run is the slow test below
    short = ["--config=configs/pretrain_tiny.py", "--config.train.steps=60",
             "--config.train.eval_every=30", "--config.train.warmup_steps=10"]
    out = run_cmd(short, workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    evals = eval_rows(workdir)
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert evals[-1]["loss"] < 0.6 * evals[0]["loss"], evals
    again = run_cmd(short, workdir)
    assert again.returncode == 0
    assert "already finished" in again.stdout


def test_sigterm_writes_checkpoint_and_exits_zero(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "experiments.run", "--config=configs/pretrain_tiny.py",
           f"--workdir={workdir}", "--config.train.steps=100000", "--config.train.log_every=1",
           "--config.train.checkpoint_every=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    deadline = time.time() + 300
    for line in proc.stdout:  # wait until training steps are running
        if "[pretrain] step 3/" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM" in stdout
    steps = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
    assert steps and max(steps) >= 3


@pytest.mark.slow
def test_full_pretrain_tiny_within_budget(tmp_path):
    start = time.time()
    out = run_cmd(["--config=configs/pretrain_tiny.py"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert time.time() - start < 300
    evals = eval_rows(tmp_path)
    assert evals[-1]["loss"] < 0.4 * evals[0]["loss"], evals
