"""Config mistakes are one line naming the key (and the valid keys or range), exit code 1,
no traceback: misspelled overrides, keys the pipeline would ignore, out-of-range values, a
batch that does not divide the mesh; and data problems found by a stage (an empty corpus,
a file too small to hold out from) are one line naming the file."""

import os
import subprocess
import sys

import pytest

from configs import base
from instructjax.stages import config_values

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cmd(args, workdir, env=None):
    return subprocess.run([sys.executable, "-m", "experiments.run", f"--workdir={workdir}", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))


def assert_one_line_error(out, *needles):
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    for needle in needles:
        assert needle in out.stderr, (needle, out.stderr[-2000:])


@pytest.mark.parametrize("override", ["--config.train.steps=3", "--config.data.path=x.jsonl"])
def test_pipeline_refuses_top_level_stage_keys(tmp_path, override):
    out = run_cmd(["--config=configs/pipeline_tiny.py", override], tmp_path)
    key = override.split("=")[0][len("--config."):]
    assert_one_line_error(out, repr(key), "stages.<stage>.<key>", "valid keys there: distributed")
    assert not os.listdir(tmp_path)  # nothing started


def test_misspelled_override_names_key_and_valid_keys(tmp_path):
    out = run_cmd(["--config=configs/pretrain_tiny.py", "--config.train.stpes=3"], tmp_path)
    assert_one_line_error(out, "'train.stpes'", "valid keys there:", "steps")


@pytest.mark.parametrize("config, override", [
    ("configs/ppo_tiny.py", "--config.train.batch_size=8"),    # PPO batches by ppo.*
    ("configs/ppo_tiny.py", "--config.train.log_every=5"),     # PPO logs every iteration
    ("configs/sft_tiny.py", "--config.tokenizer.vocab_size=64"),  # from init_from
    ("configs/pretrain_tiny.py", "--config.ppo.epochs=2"),
    ("configs/reward_tiny.py", "--config.eval.num_samples=2"),  # stats: 1 answer per prompt
])
def test_a_key_the_stage_does_not_read_is_refused(tmp_path, config, override):
    out = run_cmd([f"--config={config}", override], tmp_path)
    key = override.split("=")[0][len("--config."):]
    assert_one_line_error(out, repr(key), "valid keys")
    assert not os.listdir(tmp_path)  # nothing started


def test_each_stage_schema_holds_only_its_keys_and_says_what_steps_counts():
    assert "train" in base.get_base("ppo") and "batch_size" not in base.get_base("ppo").train
    assert "ppo" not in base.get_base("sft") and "tokenizer" not in base.get_base("reward")
    assert set(base.get_base("tokenizer")) == {"stage", "seed", "dry_run", "mesh",
                                               "distributed", "hardware", "tokenizer", "data"}
    assert "PPO iterations" in base.__doc__ and "optimiser steps" in base.__doc__


@pytest.mark.parametrize("override, needle", [
    ("--config.train.batch_size=0", "train.batch_size=0 must be >= 1"),
    ("--config.train.learning_rate=-0.1", "train.learning_rate=-0.1 must be > 0"),
    ("--config.data.seq_len=1", "data.seq_len=1 must be >= 2"),
    ("--config.train.checkpoint_every=0", "train.checkpoint_every=0 must be >= 1"),
])
def test_out_of_range_values_are_named_with_their_range(tmp_path, override, needle):
    out = run_cmd(["--config=configs/pretrain_tiny.py", override], tmp_path)
    assert_one_line_error(out, needle)


def test_value_of_the_wrong_type_is_one_line(tmp_path):
    out = run_cmd(["--config=configs/pretrain_tiny.py", "--config.train.warmup_steps=ten"],
                  tmp_path)
    assert_one_line_error(out, "--config.train.warmup_steps=ten")


def test_batch_that_does_not_divide_the_mesh(tmp_path):
    out = run_cmd(["--config=configs/pretrain_tiny.py", "--config.train.batch_size=3",
                   "--config.mesh.data=2"], tmp_path,
                  env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert_one_line_error(out, "batch_size 3", "must divide over the batch axes data x fsdp = 2")


def test_empty_corpus_file_is_one_line_naming_it(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    out = run_cmd(["--config=configs/pretrain_tiny.py", f"--config.data.path={empty}"],
                  tmp_path / "w")
    assert_one_line_error(out, str(empty))


def test_one_record_file_cannot_hold_out_is_one_line_naming_it(tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text('{"text": "only one record here"}\n', encoding="utf-8")
    out = run_cmd(["--config=configs/pretrain_tiny.py", f"--config.data.path={data}"],
                  tmp_path / "w")
    assert_one_line_error(out, str(data), "eval")


def test_vocabulary_too_small_for_the_corpus_is_one_line(tmp_path):
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "some text"}\n' * 40, encoding="utf-8")
    out = run_cmd(["--config=configs/pretrain_tiny.py", f"--config.data.path={data}",
                   "--config.tokenizer.vocab_size=40"], tmp_path / "w")
    assert_one_line_error(out, str(data), "tokenizer.vocab_size=40")


@pytest.mark.parametrize("key, value", [
    ("ppo.top_p", 1.5), ("ppo.temperature", 0.0), ("ppo.minibatch_size", 0),
    ("eval.num_samples", 0), ("reward.num_responses", 1), ("train.max_bad_steps", -1),
    ("ppo.kl_estimator", "k2"), ("mesh.fsdp", 0), ("data.eval_percent", 100),
])
def test_value_problems_name_key_value_and_range(key, value):
    group, name = key.split(".")
    config = base.get_base("reward" if group == "reward" else "ppo")  # each stage's own keys
    config[group][name] = value
    problems = config_values.value_problems(config)
    assert len(problems) == 1 and problems[0].startswith(f"{key}={value!r} must be"), problems


def test_pipeline_values_are_checked_per_stage():
    from configs import pipeline_tiny
    config = pipeline_tiny.get_config()
    config.stages.sft.train.batch_size = 0
    assert config_values.value_problems(config) == [
        "stages.sft.train.batch_size=0 must be >= 1"]
