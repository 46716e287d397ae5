"""`--config.dry_run=True` on 8 fake CPU devices: the report, its agreement with the closed
form, and the clear failure of a config that does not fit.

Tolerances (stated in docs/architecture.md too): parameter counts exact; resident buffers
(params, Adam moments, frozen copies) within 1 % of parallel/memory_model.py; each program's
argument bytes (memory_analysis) within 2 %; FLOPs of the cost twins within 10 % of the
matmul-only closed form (XLA adds elementwise work and the optimizer update); the rollout's
temporaries at least the closed-form KV cache.
"""

import json
import os
import subprocess
import sys

import chex
import pytest

from instructjax.model.config import ModelConfig, count_params

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
PPO_SMALL = ["--config.ppo.prompts_per_iteration=16", "--config.ppo.num_samples=2",
             "--config.ppo.minibatch_size=8", "--config.ppo.epochs=2", "--config.ppo.max_prompt_len=32",
             "--config.ppo.max_new_tokens=16", "--config.ppo.frozen_dtype=bfloat16"]


def dry_run(config, workdir, *args, xla_flags=True):
    """Runs the dry run in a fresh process (the fake devices must exist before jax starts)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if xla_flags:
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    else:
        env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "experiments.run", f"--config={config}", f"--workdir={workdir}",
           "--config.dry_run=True", "--config.hardware.num_devices=8", *MESH, *args]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    report = None
    path = os.path.join(workdir, "dry_run.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    return out, report


def tiny_cfg(report):
    return ModelConfig.from_dict(report["model"])


def assert_agrees_with_closed_form(report):
    n = count_params(tiny_cfg(report))
    assert report["params"] == report["closed_form_params"]
    assert all(count in (n, n + tiny_cfg(report).embed_dim + 1) or "head" in name
               for name, count in report["params"].items())
    for name, measured in report["resident_bytes_per_device"].items():
        chex.assert_trees_all_close(measured, report["closed_form_bytes_per_device"][name],
                                    rtol=0.01)
    for name, p in report["programs"].items():
        assert p["argument_bytes"] > 0, name
        chex.assert_trees_all_close(p["argument_bytes"], p["closed_form_argument_bytes"],
                                    rtol=0.02)
        assert p["total_bytes"] >= p["peak_bytes"] >= p["argument_bytes"]


def test_sft_dry_run_report(tmp_path):
    # scanned layers, as every preset above `tiny` has: the loop-counting check below needs them
    out, report = dry_run("configs/sft_tiny.py", tmp_path, "--config.train.grad_accum_steps=2",
                          "--config.model.scan_layers=True",
                          "--config.hardware.peak_tflops=1.0", "--config.hardware.hbm_gbps=100",
                          "--config.hardware.memory_per_device_gb=1.0", xla_flags=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| train_step |" in out.stdout and "| model | 918,656 |" in out.stdout
    assert report["devices"] == {"count": 8, "platform": "cpu", "virtual": True}
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    assert report["params"] == {"model": count_params(tiny_cfg(report))}
    assert_agrees_with_closed_form(report)
    step = report["programs"]["train_step"]
    chex.assert_trees_all_close(step["flops_per_device_per_step"],
                                step["closed_form_flops_per_device_per_step"], rtol=0.10)
    # XLA counts a loop body once: the scanned, accumulated step shows far fewer FLOPs.
    assert step["xla_flops_per_call_loops_once"] < 0.5 * step["flops_per_device_per_step"]
    assert step["seconds_per_step"] > 0


def test_too_big_config_fails_naming_the_program(tmp_path):
    out, report = dry_run("configs/sft_tiny.py", tmp_path,
                          "--config.hardware.memory_per_device_gb=0.001")
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dry run: program 'train_step' needs"), last
    assert "hardware.memory_per_device_gb=0.001" in last
    assert report is not None  # the numbers that explain the failure are kept


def test_ppo_dry_run_compiles_every_phase(tmp_path):
    # shared critic (a value head) and decoding from the fsdp-gathered copy: the rollout's
    # argument bytes are checked against the closed form of that copy
    out, report = dry_run("configs/ppo_tiny.py", tmp_path, *PPO_SMALL,
                          "--config.hardware.memory_per_device_gb=1.0",
                          "--config.ppo.critic=shared", "--config.ppo.rollout_weights=gathered")
    assert out.returncode == 0, out.stderr[-3000:]
    assert set(report["programs"]) == {"rollout", "policy_forward", "reference_forward",
                                       "reward_forward", "ppo_update"}
    cfg = tiny_cfg(report)
    n = count_params(cfg)
    assert report["params"] == {"policy": n, "reference": n, "reward_model": n + cfg.embed_dim + 1,
                                "value_head": cfg.embed_dim + 1}
    assert_agrees_with_closed_form(report)
    # frozen models in bf16: half the bytes of the float32 trunk
    resident = report["resident_bytes_per_device"]
    chex.assert_trees_all_close(resident["reference_params"] * 2,
                                resident["policy_params"], rtol=0.01)
    assert report["programs"]["rollout"]["temp_bytes"] >= report["closed_form_bytes_per_device"]["kv_cache"]
    # 2 epochs x 32 rows (16 prompts x 2 samples) / minibatches of 8
    assert report["programs"]["ppo_update"]["calls_per_step"] == 2 * 32 // 8


@pytest.mark.slow
def test_ppo_dry_run_step_time(tmp_path):
    out, report = dry_run("configs/ppo_tiny.py", tmp_path, *PPO_SMALL,
                          "--config.hardware.peak_tflops=1.0", "--config.hardware.hbm_gbps=100")
    assert out.returncode == 0, out.stderr[-3000:]
    for name, p in report["programs"].items():
        chex.assert_trees_all_close(p["flops_per_device_per_step"],
                                    p["closed_form_flops_per_device_per_step"], rtol=0.10)
        assert p["seconds_per_step"] > 0, name
