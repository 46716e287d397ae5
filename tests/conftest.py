"""Fixtures shared by several test directories."""

import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import pytest

from instructjax.data import demo_corpus, tokenizer as tok_lib
from instructjax.model.config import ModelConfig
from instructjax.model.heads import RewardModel
from instructjax.model.transformer import Transformer, init_boxed_params
from instructjax.stages import workdirs
from instructjax.train import checkpoint as ckpt_lib


def write_stage_dir(path, stage, cfg, tokenizer_path, params, extra_files=None):
    """A finished stage directory as later stages read it: run_info, tokenizer, params."""
    os.makedirs(path, exist_ok=True)
    shutil.copyfile(tokenizer_path, os.path.join(path, workdirs.TOKENIZER_FILE))
    with open(os.path.join(path, workdirs.RUN_INFO), "w") as f:
        json.dump({"stage": stage, "model": dataclasses.asdict(cfg),
                   "tokenizer": workdirs.TOKENIZER_FILE}, f)
    ckpt_lib.export_params(path, params)
    for name, content in (extra_files or {}).items():
        with open(os.path.join(path, name), "w") as f:
            json.dump(content, f)


def write_random_sft_and_reward(root, num_kv_heads: int) -> ModelConfig:
    """Random tiny models standing in for finished SFT and reward stages, in root/sft and
    root/reward (demo tokenizer, 512 pieces; reward stats mean 0, std 1). Returns their config.
    """
    corpus = demo_corpus.write_demo_corpus(root / "corpus", seed=0, num_train_docs=400,
                                           num_eval_docs=10)
    tok = tok_lib.train_tokenizer([corpus["train"]], str(root / "tok.model"), 512, seed=0)
    cfg = ModelConfig(vocab_size=512, embed_dim=32, num_layers=2, num_heads=2,
                      num_kv_heads=num_kv_heads, head_dim=16, mlp_dim=64, max_seq_len=128)
    policy = init_boxed_params(Transformer(cfg), jax.random.key(1))
    rm = init_boxed_params(RewardModel(cfg), jax.random.key(2))
    write_stage_dir(root / "sft", "sft", cfg, tok.model_path, nn.meta.unbox(policy))
    write_stage_dir(root / "reward", "reward", cfg, tok.model_path, nn.meta.unbox(rm),
                    {workdirs.REWARD_STATS: {"mean": 0.0, "std": 1.0, "num_samples": 1}})
    return cfg


@pytest.fixture(scope="session")
def random_sft_and_reward():
    """`write_random_sft_and_reward`, for module fixtures that pick the kv-head count."""
    return write_random_sft_and_reward
