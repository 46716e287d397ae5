"""Fixtures shared by several test directories."""

import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from instructjax.data import demo, tokenizer as tok_lib
from instructjax.model.config import ModelConfig
from instructjax.model.heads import RewardModel
from instructjax.model.transformer import Transformer
from instructjax.stages import common, reward as reward_stage
from instructjax.train import checkpoint as ckpt_lib


def write_stage_dir(path, stage, cfg, tokenizer_path, params, extra_files=None):
    """A finished stage directory as later stages read it: run_info, tokenizer, params."""
    os.makedirs(path, exist_ok=True)
    shutil.copyfile(tokenizer_path, os.path.join(path, common.TOKENIZER_FILE))
    with open(os.path.join(path, common.RUN_INFO), "w") as f:
        json.dump({"stage": stage, "model": dataclasses.asdict(cfg),
                   "tokenizer": common.TOKENIZER_FILE}, f)
    ckpt_lib.export_params(path, params)
    for name, content in (extra_files or {}).items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f)


def write_random_sft_and_reward(root, num_kv_heads: int) -> ModelConfig:
    """Random tiny models standing in for finished SFT and reward stages, in root/sft and
    root/reward (demo tokenizer, 512 pieces; reward stats mean 0, std 1). Returns their config.
    """
    corpus = demo.write_demo_corpus(root / "corpus", seed=0, num_train_docs=400, num_eval_docs=10)
    tok = tok_lib.train_tokenizer([corpus["train"]], str(root / "tok.model"), 512, seed=0)
    cfg = ModelConfig(vocab_size=512, embed_dim=32, num_layers=2, num_heads=2,
                      num_kv_heads=num_kv_heads, head_dim=16, mlp_dim=64, max_seq_len=128)
    policy = Transformer(cfg).init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"]
    rm = RewardModel(cfg).init(jax.random.key(2), jnp.zeros((1, 8), jnp.int32))["params"]
    write_stage_dir(root / "sft", "sft", cfg, tok.model_path, nn.meta.unbox(policy))
    write_stage_dir(root / "reward", "reward", cfg, tok.model_path, nn.meta.unbox(rm),
                    {reward_stage.REWARD_STATS: {"mean": 0.0, "std": 1.0, "num_samples": 1}})
    return cfg


@pytest.fixture(scope="session")
def random_sft_and_reward():
    """`write_random_sft_and_reward`, for module fixtures that pick the kv-head count."""
    return write_random_sft_and_reward
