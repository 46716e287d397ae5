"""Stage 0: next-token pretraining on a text corpus (packed documents, segment-aware attention)."""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from instructjax.data import demo, pipeline, tfds_builders
from instructjax.model.transformer import Transformer
from instructjax.stages import common
from instructjax.train import loop
from instructjax.train.losses import lm_loss_fn


def corpus_paths(config: Any, workdir: str) -> tuple[list[str], list[str] | None]:
    """(train paths, eval paths or None) from `config.data`; the demo corpus when empty."""
    from instructjax.data import jsonl
    if not config.data.path:
        written = common.main_process_first(
            lambda: demo.write_demo_corpus(os.path.join(workdir, "data", "demo"),
                                           seed=int(config.data.demo_seed)), "demo_corpus")
        return [written["train"]], [written["eval"]]
    train = jsonl.resolve_paths(config.data.path)
    evals = jsonl.resolve_paths(config.data.eval_path) if config.data.eval_path else None
    return train, evals


def run(config: Any, workdir: str) -> loop.LoopResult:
    """Runs (or resumes, or skips if finished) pretraining in `workdir`."""
    os.makedirs(workdir, exist_ok=True)
    common.check_resume_config(config, workdir)  # before anything in workdir changes
    mesh = common.build_mesh(config)
    train_paths, eval_paths = corpus_paths(config, workdir)
    tokenizer = common.ensure_tokenizer(config, workdir, train_paths)
    model_cfg = common.model_config(config, tokenizer)
    model = Transformer(model_cfg)

    sources = common.main_process_first(lambda: tfds_builders.build_text_source(
        train_paths, eval_paths, os.path.join(workdir, "data", "tfds"),
        text_field=str(config.data.text_field), eval_percent=int(config.data.eval_percent)),
        "tfds")
    seq_len, batch_size = int(config.data.seq_len), int(config.train.batch_size)
    if seq_len > model_cfg.max_seq_len:
        raise common.StageError(
            f"data.seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    per_process_batch = batch_size // jax.process_count()

    def train_batches():
        return pipeline.make_lm_batches(sources["train"], tokenizer, seq_len=seq_len,
                                        batch_size=per_process_batch, seed=int(config.seed),
                                        text_field="text", **shard)

    def eval_batches():
        return pipeline.make_lm_batches(sources["eval"], tokenizer, seq_len=seq_len,
                                        batch_size=per_process_batch, seed=0, num_epochs=1,
                                        text_field="text", **shard)

    def init_params_boxed(rng):
        return model.init(rng, jnp.zeros((1, min(seq_len, 8)), jnp.int32))["params"]

    task = loop.SupervisedTask(
        name="pretrain", init_params_boxed=init_params_boxed, loss_fn=lm_loss_fn(model),
        make_train_batches=train_batches, make_eval_batches=eval_batches,
        tokens_per_batch=batch_size * seq_len)
    common.write_run_info(workdir, "pretrain", model_cfg)
    return loop.run_supervised(task, config.train, mesh, workdir, seed=int(config.seed))
