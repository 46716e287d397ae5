"""A run records its whole config; resuming with another config is refused naming every
changed key (before anything in the workdir changes), except the changes allowed on resume.
On main a changed model shape was treated as checkpoint corruption: every checkpoint was
moved aside and the stage restarted at step 0."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import base
from instructjax.stages import resume_check

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_checkpoint_dir(workdir, step):
    os.makedirs(os.path.join(workdir, "checkpoints", str(step)), exist_ok=True)


def test_fresh_start_records_config_then_refuses_changed_keys(tmp_path):
    workdir = str(tmp_path)
    config = base.get_base("pretrain")
    resume_check.check_resume_config(config, workdir)
    saved = json.loads((tmp_path / resume_check.RUN_CONFIG).read_text())
    assert saved["model.embed_dim"] == config.model.embed_dim and saved["train.steps"] == 1000
    make_checkpoint_dir(workdir, 500)

    changed = config.copy_and_resolve_references()
    changed.model.embed_dim = 2 * config.model.embed_dim
    changed.train.learning_rate = 1.0
    with pytest.raises(resume_check.ConfigChangedError) as err:
        resume_check.check_resume_config(changed, workdir)
    message = str(err.value)
    assert f"model.embed_dim: {config.model.embed_dim} -> {2 * config.model.embed_dim}" in message
    assert "train.learning_rate: 0.0003 -> 1.0" in message
    assert json.loads((tmp_path / resume_check.RUN_CONFIG).read_text()) == saved  # untouched


def test_allowed_changes_are_accepted_and_recorded(tmp_path, capsys):
    workdir = str(tmp_path)
    config = base.get_base("sft")
    resume_check.check_resume_config(config, workdir)
    make_checkpoint_dir(workdir, 500)
    changed = config.copy_and_resolve_references()
    changed.train.steps = 2000                  # longer: the schedule is recomputed
    changed.train.log_every = 1
    changed.mesh.fsdp = 2                       # resharded on restore
    changed.model.remat_policy = "full"         # same math, less memory
    resume_check.check_resume_config(changed, workdir)
    assert "learning-rate schedule is recomputed for 2000 steps" in capsys.readouterr().out
    saved = json.loads((tmp_path / resume_check.RUN_CONFIG).read_text())
    assert saved["train.steps"] == 2000 and saved["mesh.fsdp"] == 2


def test_fewer_steps_than_the_newest_checkpoint_are_refused(tmp_path):
    workdir = str(tmp_path)
    config = base.get_base("pretrain")
    resume_check.check_resume_config(config, workdir)
    make_checkpoint_dir(workdir, 500)
    config.train.steps = 400
    with pytest.raises(resume_check.ConfigChangedError, match="train.steps=400 is below the newest "
                                                        "checkpoint"):
        resume_check.check_resume_config(config, workdir)


def test_without_progress_the_config_is_simply_rewritten(tmp_path):
    workdir = str(tmp_path)
    config = base.get_base("pretrain")
    resume_check.check_resume_config(config, workdir)
    config.model.embed_dim = 8  # no checkpoint yet: nothing to protect
    resume_check.check_resume_config(config, workdir)
    assert json.loads((tmp_path / resume_check.RUN_CONFIG).read_text())["model.embed_dim"] == 8


def test_may_change_on_resume_prefixes():
    assert resume_check.may_change_on_resume("mesh.data")
    assert resume_check.may_change_on_resume("train.steps")
    assert not resume_check.may_change_on_resume("train.stepsize")
    assert not resume_check.may_change_on_resume("model.embed_dim")
    assert resume_check.config_changes({"a": 1, "b": 2}, {"a": 1, "c": 3}) == {
        "b": (2, "<absent>"), "c": ("<absent>", 3)}
    assert resume_check.flatten_config(ml_collections.ConfigDict({"x": {"y": (1, 2)}})) == {
        "x.y": [1, 2]}


def run_cmd(args, workdir):
    return subprocess.run([sys.executable, "-m", "experiments.run", f"--workdir={workdir}",
                           "--config=configs/pretrain_tiny.py", "--config.train.eval_every=100",
                           "--config.train.checkpoint_every=3", "--config.train.log_every=1",
                           "--config.train.async_checkpoint=False", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))


def snapshot(workdir):
    """(relative path, size, mtime) of every file: what a refused resume must not touch."""
    files = []
    for root, _, names in os.walk(workdir):
        for name in names:
            path = os.path.join(root, name)
            files.append((os.path.relpath(path, workdir), os.path.getsize(path),
                          os.path.getmtime(path)))
    return sorted(files)


def test_command_refuses_changed_model_keeps_everything_then_extends(tmp_path):
    workdir = tmp_path / "run"
    first = run_cmd(["--config.train.steps=6"], workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    before = snapshot(workdir)

    changed = run_cmd(["--config.train.steps=6", "--config.model.embed_dim=96"], workdir)
    assert changed.returncode == 1
    assert "model.embed_dim: 128 -> 96" in changed.stderr and "Traceback" not in changed.stderr
    assert snapshot(workdir) == before  # no checkpoint moved aside, nothing rewritten
    assert not [p for p in os.listdir(workdir / "checkpoints") if "broken" in p]

    longer = run_cmd(["--config.train.steps=9"], workdir)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resuming from step 6" in longer.stdout
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 10))


def test_paths_relative_absolute_or_moved_run_still_resume(tmp_path, monkeypatch):
    """The pipeline wires init_from / reward_from / tokenizer.path from the workdir: the same
    run reached by a relative path, or moved whole, is the same run."""
    import shutil
    root = tmp_path / "run"
    config = base.get_base("ppo")
    config.init_from = str(root / "sft")
    config.ppo.reward_from = str(root / "reward")
    resume_check.check_resume_config(config, str(root / "ppo"))
    make_checkpoint_dir(str(root / "ppo"), 3)
    saved = json.loads((root / "ppo" / resume_check.RUN_CONFIG).read_text())
    assert saved["init_from"] == os.path.join("..", "sft")

    monkeypatch.chdir(tmp_path)  # the same run through relative paths
    relative = config.copy_and_resolve_references()
    relative.init_from, relative.ppo.reward_from = "run/sft", "run/reward"
    resume_check.check_resume_config(relative, "run/ppo")

    moved = tmp_path / "elsewhere"
    shutil.move(str(root), str(moved))
    config.init_from, config.ppo.reward_from = str(moved / "sft"), str(moved / "reward")
    resume_check.check_resume_config(config, str(moved / "ppo"))

    config.init_from = str(tmp_path / "another" / "sft")  # a different SFT model: refused
    with pytest.raises(resume_check.ConfigChangedError, match="init_from"):
        resume_check.check_resume_config(config, str(moved / "ppo"))


def test_keys_added_by_a_schema_change_are_accepted_with_a_note(tmp_path, capsys):
    workdir = str(tmp_path)
    config = base.get_base("sft")
    resume_check.check_resume_config(config, workdir)
    make_checkpoint_dir(workdir, 3)
    saved = json.loads((tmp_path / resume_check.RUN_CONFIG).read_text())
    del saved["train.max_bad_steps"]  # as written by a version without that key
    (tmp_path / resume_check.RUN_CONFIG).write_text(json.dumps(saved))
    resume_check.check_resume_config(config, workdir)
    assert "config schema changed" in capsys.readouterr().out
