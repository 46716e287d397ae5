"""Stage 0: next-token pretraining on a text corpus (packed documents, segment-aware attention)."""

from __future__ import annotations

import os
from typing import Any

import jax

from instructjax.data import loaders, text_sources
from instructjax.model.transformer import Transformer, init_boxed_params
from instructjax.stages import common, workdirs
from instructjax.train import loop
from instructjax.train.losses import lm_loss_fn


def _model_and_tokenizer(s, workdir: str, train_paths: list[str]):
    """(ModelConfig, tokenizer): an imported model's (`init_from_hf`, which brings its own
    tokenizer) or config.model's with the configured or trained tokenizer."""
    if s.init_from_hf:
        if s.tokenizer.path:
            raise common.StageError(
                f"config.tokenizer.path={s.tokenizer.path!r} and config.init_from_hf are both "
                "set: an imported model brings its own tokenizer; clear tokenizer.path")
        _, model_cfg, tokenizer = workdirs.init_from_stage(s.init_from_hf, s.model, workdir,
                                                           ("hf",))
        return model_cfg, tokenizer
    tokenizer = workdirs.ensure_tokenizer(s.tokenizer, s.seed, workdir, train_paths,
                                         s.data.text_field)
    return workdirs.model_config(s.model, tokenizer), tokenizer


def run(config: Any, workdir: str) -> loop.LoopResult:
    """Runs (or resumes, or skips if finished) pretraining in `workdir`."""
    s = workdirs.start_stage(config, workdir)
    train_paths, eval_paths = workdirs.corpus_paths(s.data, workdir)
    model_cfg, tokenizer = _model_and_tokenizer(s, workdir, train_paths)
    model = Transformer(model_cfg)
    mesh = common.build_mesh(s.mesh, model_cfg.to_dict(), global_batch=s.train_batch_size,
                             micro_batches=s.loop.grad_accum_steps)

    sources = common.main_process_first(lambda: text_sources.build_text_source(
        train_paths, eval_paths, os.path.join(workdir, "data", "tfds"),
        text_field=s.data.text_field, eval_percent=s.data.eval_percent), "tfds")
    seq_len = s.data.seq_len
    if seq_len > model_cfg.max_seq_len:
        raise common.StageError(
            f"data.seq_len={seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    per_process_batch = s.train_batch_size // jax.process_count()

    def train_batches():
        return loaders.make_lm_batches(sources["train"], tokenizer, seq_len=seq_len,
                                       batch_size=per_process_batch, seed=s.seed,
                                       text_field="text", **shard)

    def eval_batches():
        return loaders.make_lm_batches(sources["eval"], tokenizer, seq_len=seq_len,
                                       batch_size=per_process_batch, seed=0, num_epochs=1,
                                       text_field="text", **shard)

    def init_params_boxed(rng):
        return init_boxed_params(model, rng, batch_shape=(1, min(seq_len, 8)))

    task = loop.SupervisedTask(
        name="pretrain", init_params_boxed=init_params_boxed, loss_fn=lm_loss_fn(model),
        make_train_batches=train_batches, make_eval_batches=eval_batches,
        load_initial_params=(lambda: workdirs.load_transformer_params(s.init_from_hf, model_cfg,
                                                                      mesh))
        if s.init_from_hf else None,
        tokens_per_batch=s.train_batch_size * seq_len)
    workdirs.write_run_info(workdir, "pretrain", model_cfg)
    return loop.run_supervised(task, s.loop, s.optim, mesh, workdir)
