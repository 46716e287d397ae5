"""Pieces every stage needs: errors, mesh, tokenizer, model config, run records."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
from jax.sharding import Mesh

from instructjax.data import tokenizer as tok_lib
from instructjax.model.config import ModelConfig
from instructjax.parallel import mesh as mesh_lib

RUN_INFO = "run_info.json"        # model config + tokenizer of a stage's workdir
TOKENIZER_FILE = "tokenizer.model"


class StageError(ValueError):
    """A user-facing problem with a stage's config or inputs (printed as one line)."""


def is_main_process() -> bool:
    """True on the process that writes logs, summaries and run records."""
    return jax.process_index() == 0


def build_mesh(config: Any) -> Mesh:
    """The device mesh of `config.mesh`, checked against the batch and head counts."""
    mesh = mesh_lib.make_mesh(dict(config.mesh))
    mesh_lib.check_fits(mesh, global_batch=int(config.train.batch_size),
                        num_heads=int(config.model.num_heads),
                        num_kv_heads=int(config.model.num_kv_heads),
                        micro_batches=int(config.train.grad_accum_steps))
    return mesh


def model_config(config: Any, tokenizer: tok_lib.Tokenizer) -> ModelConfig:
    """ModelConfig from `config.model`, checked against the tokenizer's vocabulary."""
    try:
        cfg = ModelConfig.from_dict(config.model.to_dict())
    except ValueError as err:
        raise StageError(f"config.model: {err}") from err
    if cfg.vocab_size < tokenizer.vocab_size:
        raise StageError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size} pieces, {tokenizer.model_path})")
    return cfg


def ensure_tokenizer(config: Any, workdir: str, corpus_paths: list[str]) -> tok_lib.Tokenizer:
    """Loads `config.tokenizer.path`, or trains one on `corpus_paths` (once per workdir).

    The model file is copied to WORKDIR/tokenizer.model so a stage's workdir is
    self-contained for the stages that initialise from it.
    """
    local = os.path.join(workdir, TOKENIZER_FILE)
    if config.tokenizer.path:
        tokenizer = tok_lib.load_tokenizer(config.tokenizer.path)
        if is_main_process() and os.path.abspath(config.tokenizer.path) != os.path.abspath(local):
            os.makedirs(workdir, exist_ok=True)
            shutil.copyfile(config.tokenizer.path, local)
        return tokenizer
    if os.path.exists(local):
        return tok_lib.load_tokenizer(local)
    os.makedirs(workdir, exist_ok=True)
    return tok_lib.train_tokenizer(
        corpus_paths, local, int(config.tokenizer.vocab_size),
        model_type=str(config.tokenizer.model_type), seed=int(config.seed),
        max_lines=int(config.tokenizer.max_training_lines))


def write_run_info(workdir: str, stage: str, model_cfg: ModelConfig, extra: dict | None = None):
    """Records what an earlier stage's checkpoint needs to be loaded by a later stage."""
    if not is_main_process():
        return
    info = {"stage": stage, "model": dataclasses.asdict(model_cfg), "tokenizer": TOKENIZER_FILE,
            **(extra or {})}
    with open(os.path.join(workdir, RUN_INFO), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, ensure_ascii=False)


def read_run_info(workdir: str) -> dict:
    """The run record of an earlier stage's workdir (clear error if it is not one)."""
    path = os.path.join(workdir, RUN_INFO)
    if not os.path.exists(path):
        raise StageError(f"init_from={workdir!r} is not a finished stage workdir ({path} missing)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
