"""Stage 1: supervised fine-tuning on dialogues in the unified Input->Output format.

The model starts from the pretrain stage's exported parameters; the loss covers only the
assistant answers (+ EOS), on packed rows whose documents never attend to each other.
On the demo task, evaluation also reports the true score of greedy and sampled answers.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import numpy as np

from instructjax.data import chat_encoding, dialogue_sources, formats, loaders
from instructjax.eval import true_score as true_score_lib
from instructjax.model.transformer import Transformer, init_boxed_params
from instructjax.stages import common, workdirs
from instructjax.train import loop
from instructjax.train.losses import lm_loss_fn


def sft_document(dialogue: formats.Dialogue, *, tokenizer, template: chat_encoding.ChatTemplate,
                 max_length: int, max_turns: int, train_on: str,
                 on_truncate: chat_encoding.OnTruncate = None) -> dict[str, np.ndarray]:
    """One dialogue -> {"tokens" int32 [n], "loss_weights" float32 [n]} for packing."""
    tokens, weights = chat_encoding.encode_sft(dialogue, tokenizer, template,
                                               max_length=max_length, max_turns=max_turns,
                                               train_on=train_on, on_truncate=on_truncate)
    return {"tokens": np.asarray(tokens, np.int32), "loss_weights": np.asarray(weights, np.float32)}


def run(config: Any, workdir: str) -> loop.LoopResult:
    """Runs (or resumes, or skips if finished) SFT in `workdir` from `config.init_from`."""
    s = workdirs.start_stage(config, workdir)
    model_cfg, tokenizer, mesh = workdirs.from_earlier_stage(s, workdir, ("pretrain", "sft"))
    model = Transformer(model_cfg)
    template = s.chat.template_for(tokenizer)

    train_paths, eval_paths = workdirs.stage_data_paths(s.data, workdir, "sft_train", "sft_eval")
    sources = common.main_process_first(lambda: dialogue_sources.build_sft_source(
        train_paths, eval_paths, os.path.join(workdir, "data", "tfds"),
        eval_percent=s.data.eval_percent, skip_malformed=s.data.skip_malformed), "tfds")

    seq_len, batch_size = s.data.seq_len, s.train_batch_size
    encode = functools.partial(sft_document, tokenizer=tokenizer, template=template,
                               max_length=seq_len, max_turns=s.chat.max_turns,
                               train_on=s.sft_train_on)
    to_document = functools.partial(encode, on_truncate=chat_encoding.TruncationLog(
        "sft", f"data.seq_len={seq_len}", echo=common.is_main_process()))
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    per_process_batch = batch_size // jax.process_count()

    def batches(split, **kwargs):
        return loaders.make_lm_batches(sources[split], tokenizer, seq_len=seq_len,
                                       batch_size=per_process_batch, to_document=to_document,
                                       **shard, **kwargs)

    prompt_sets = workdirs.eval_prompt_sets(s.data, s.eval.num_prompts, workdir)
    extra_eval = None
    if prompt_sets:
        extra_eval = functools.partial(true_score_lib.evaluate_sets, model=model,
                                       tokenizer=tokenizer, template=template,
                                       prompt_sets=prompt_sets, eval_cfg=s.eval, mesh=mesh)

    def init_params_boxed(rng):
        return init_boxed_params(model, rng)

    task = loop.SupervisedTask(
        name="sft", init_params_boxed=init_params_boxed, loss_fn=lm_loss_fn(model),
        make_train_batches=lambda: batches("train", seed=s.seed),
        make_eval_batches=lambda: batches("eval", seed=0, num_epochs=1, shuffle=False),
        load_initial_params=lambda: workdirs.load_transformer_params(s.init_from, model_cfg,
                                                                     mesh),
        extra_eval=extra_eval, tokens_per_batch=batch_size * seq_len)
    workdirs.write_run_info(workdir, "sft", model_cfg, {"chat_format": s.chat.format})
    if common.is_main_process():
        write_encoded_example(workdir, sources["train"][0], encode, tokenizer)
    return loop.run_supervised(task, s.loop, s.optim, mesh, workdir)


ENCODED_EXAMPLE = "encoded_example.txt"


def write_encoded_example(workdir: str, dialogue: formats.Dialogue, encode, tokenizer):
    """WORKDIR/encoded_example.txt: the first training dialogue as the model reads it
    (`encode`: dialogue -> sft_document), the tokens the loss covers inside ⟦ ⟧ (what the
    template and the mask made of the data)."""
    document = encode(dialogue)
    text = chat_encoding.describe_encoding(document["tokens"].tolist(),
                                           document["loss_weights"].tolist(), tokenizer)
    with open(os.path.join(workdir, ENCODED_EXAMPLE), "w", encoding="utf-8") as f:
        f.write(text + "\n")
