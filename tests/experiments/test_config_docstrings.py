"""The single-stage configs' docstring commands work as written, in sequence: each stage's
`init_from` / `reward_from` is the workdir an earlier docstring command writes (checked
statically by default; run as written, end to end, under -m slow)."""

import importlib
import json
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEQUENCE = ("pretrain_tiny", "sft_tiny", "reward_tiny", "ppo_tiny")


def docstring_command(name: str) -> list[str]:
    """The `python -m experiments.run ...` command of configs/<name>.py's docstring as argv."""
    doc = importlib.import_module(f"configs.{name}").__doc__
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if "python -m experiments.run" in line)
    text = ""
    for line in lines[start:]:
        text += line.strip().rstrip("\\") + " "
        if not line.rstrip().endswith("\\"):
            break
    argv = shlex.split(text)
    assert argv[:3] == ["python", "-m", "experiments.run"], argv
    return argv[3:]


def flag(argv: list[str], name: str) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    return values[-1] if values else None


def test_docstring_commands_chain_their_workdirs():
    workdirs = {}
    for name in SEQUENCE:
        argv = docstring_command(name)
        assert flag(argv, "config") == f"configs/{name}.py"
        stage = name.replace("_tiny", "")
        workdirs[stage] = flag(argv, "workdir")
        assert workdirs[stage] == f"/tmp/ijx/{stage}", (name, workdirs[stage])
        previous = {"sft": "pretrain", "reward": "sft", "ppo": "sft"}.get(stage)
        if previous:
            assert flag(argv, "config.init_from") == workdirs[previous], name
        if stage == "ppo":
            assert flag(argv, "config.ppo.reward_from") == workdirs["reward"]
        # the config's own default agrees with its docstring
        config = importlib.import_module(f"configs.{name}").get_config()
        if previous:
            assert config.init_from == workdirs[previous], name


@pytest.mark.slow
@pytest.mark.timeout(3600)  # four full tiny stages: about 15 minutes on 2 idle cores
def test_docstring_commands_run_as_written_in_sequence(tmp_path):
    """Runs the four commands (paths moved under tmp_path) and checks each docstring's claims
    that a test can read: pretrain's starting and final eval loss, the later stages' outputs."""
    for name in SEQUENCE:
        argv = [a.replace("/tmp/ijx", str(tmp_path)) for a in docstring_command(name)]
        out = subprocess.run([sys.executable, "-m", "experiments.run", *argv], cwd=REPO,
                             capture_output=True, text=True, timeout=1800,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
        assert out.returncode == 0, (name, out.stderr[-3000:])
    rows = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").open()]
    evals = [r["loss"] for r in rows if r["split"] == "eval"]
    assert 7.0 < evals[0] < 7.6 and evals[-1] < 1.0, evals  # pretrain_tiny's docstring
    assert (tmp_path / "reward" / "reward_stats.json").exists()
    assert (tmp_path / "ppo" / "params").is_dir()
