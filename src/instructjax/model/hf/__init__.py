"""Hugging Face checkpoints in and out: config mapping, safetensors reading and writing.

  load_hf(path, *, mesh=None, dtype="float32", scan_layers=True, max_seq_len=None)
      -> (params, ModelConfig, info)
  save_hf(params, model_config, path, *, tokenizer=None, max_shard_bytes=..., dtype=None,
          info=None)
  load_hf_reward / save_hf_reward: the same for RewardModel <-> <Family>ForSequenceClassification.

Modules: configs.py (config.json <-> ModelConfig), layout.py (param <-> tensor mapping and
slice arithmetic), safetensors_io.py (files), convert.py (the public functions).
"""
from instructjax.model.hf.configs import UnsupportedCheckpointError
from instructjax.model.hf.convert import (CheckpointMismatchError, load_hf, load_hf_reward,
                                          save_hf, save_hf_reward)

__all__ = ["CheckpointMismatchError", "UnsupportedCheckpointError", "load_hf",
           "load_hf_reward", "save_hf", "save_hf_reward"]
