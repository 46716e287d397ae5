"""The scaled configs: valid keys, a declared target, a mesh that covers it, the exact parameter
count in the docstring, bf16 compute and bf16 frozen models."""

import importlib
import math

import pytest

from experiments.run import check_config
from instructjax.model.config import ModelConfig, count_params
from instructjax.parallel import mesh as mesh_lib

SCALED = ["ppo_1b", "sft_1b", "reward_1b", "ppo_10b", "sft_10b", "reward_10b"]


@pytest.mark.parametrize("name", SCALED)
def test_scaled_config(name):
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config()
    check_config(config)  # every key is in configs/base.py's schema
    hw = config.hardware
    assert hw.name and hw.memory_per_device_gb > 0 and hw.peak_tflops > 0 and hw.hbm_gbps > 0
    shape = mesh_lib.resolve_mesh_shape(dict(config.mesh), int(hw.num_devices))
    assert math.prod(shape) == hw.num_devices
    cfg = ModelConfig.from_dict(config.model.to_dict())
    assert cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"
    assert cfg.scan_layers and cfg.remat_policy != "none"
    n = count_params(cfg)
    expected = n + cfg.embed_dim + 1 if config.stage == "reward" else n
    assert f"{expected:,}" in module.__doc__
    if config.stage == "ppo":
        assert config.ppo.frozen_dtype == "bfloat16"
        rows = config.ppo.prompts_per_iteration * config.ppo.num_samples
        assert rows % config.ppo.minibatch_size == 0
        assert config.ppo.minibatch_size % (shape[0] * shape[1]) == 0
    mesh_shape = dict(zip(mesh_lib.MESH_AXES, shape))
    assert cfg.num_kv_heads % mesh_shape["tensor"] == 0


def test_10b_is_ten_billion():
    cfg = ModelConfig.from_dict(importlib.import_module("configs.ppo_10b").get_config().model.to_dict())
    assert count_params(cfg) == 10_237_096_960
