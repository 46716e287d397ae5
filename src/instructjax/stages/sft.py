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
import jax.numpy as jnp
import numpy as np

from instructjax.data import chat_encoding, dialogue_sources, formats, pipeline
from instructjax.eval import true_score as true_score_lib
from instructjax.model.transformer import Transformer
from instructjax.stages import common
from instructjax.train import loop
from instructjax.train.losses import lm_loss_fn


def chat_template(config: Any) -> chat_encoding.ChatTemplate:
    """The ChatTemplate of `config.chat`."""
    return chat_encoding.ChatTemplate(user=str(config.chat.user),
                                      assistant=str(config.chat.assistant))


def sft_document(dialogue: formats.Dialogue, *, tokenizer, template: chat_encoding.ChatTemplate,
                 max_length: int, max_turns: int, train_on: str,
                 on_truncate: chat_encoding.OnTruncate = None) -> dict[str, np.ndarray]:
    """One dialogue -> {"tokens" int32 [n], "loss_weights" float32 [n]} for packing."""
    tokens, weights = chat_encoding.encode_sft(dialogue, tokenizer, template,
                                               max_length=max_length, max_turns=max_turns,
                                               train_on=train_on, on_truncate=on_truncate)
    return {"tokens": np.asarray(tokens, np.int32), "loss_weights": np.asarray(weights, np.float32)}


# The demo task's true-score eval sets, by metric-name prefix (eval/true_score.py):
#   ""          prompts_eval: new prompts (new earlier exchanges, mixed languages) whose final
#               question is one of the problems the training files ask -- held-out prompts
#               of the training distribution, as InstructGPT's evaluations use;
#   "heldout_"  prompts_heldout: problems that no SFT, comparison or PPO file asks
#               (generalisation; only the pretraining corpus states them as facts).
DEMO_EVAL_SETS = {"": "prompts_eval", "heldout_": "prompts_heldout"}


def eval_prompt_sets(config: Any, workdir: str) -> dict[str, list[formats.Prompt]] | None:
    """Metric prefix -> the first eval.num_prompts prompts of each demo eval set
    (`DEMO_EVAL_SETS`); None for user data, which has no true score."""
    if config.data.path:
        return None
    paths = common.demo_task_paths(config, workdir)
    return {prefix: dialogue_sources.read_records(paths[name], "prompt")[0][
        : int(config.eval.num_prompts)] for prefix, name in DEMO_EVAL_SETS.items()}


def run(config: Any, workdir: str) -> loop.LoopResult:
    """Runs (or resumes, or skips if finished) SFT in `workdir` from `config.init_from`."""
    os.makedirs(workdir, exist_ok=True)
    common.check_resume_config(config, workdir)  # before anything in workdir changes
    info, model_cfg, tokenizer = common.init_from_stage(config, workdir, ("pretrain", "sft"))
    mesh = common.build_mesh(config)
    model = Transformer(model_cfg)
    template = chat_template(config)

    train_paths, eval_paths = common.stage_data_paths(config, workdir, "sft_train", "sft_eval")
    sources = common.main_process_first(lambda: dialogue_sources.build_sft_source(
        train_paths, eval_paths, os.path.join(workdir, "data", "tfds"),
        eval_percent=int(config.data.eval_percent)), "tfds")

    seq_len, batch_size = int(config.data.seq_len), int(config.train.batch_size)
    to_document = functools.partial(
        sft_document, tokenizer=tokenizer, template=template, max_length=seq_len,
        max_turns=int(config.chat.max_turns), train_on=str(config.sft.train_on),
        on_truncate=chat_encoding.TruncationLog("sft", f"data.seq_len={seq_len}",
                                                echo=common.is_main_process()))
    shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    per_process_batch = batch_size // jax.process_count()

    def batches(split, **kwargs):
        return pipeline.make_lm_batches(sources[split], tokenizer, seq_len=seq_len,
                                        batch_size=per_process_batch, to_document=to_document,
                                        **shard, **kwargs)

    prompt_sets = eval_prompt_sets(config, workdir)
    extra_eval = None
    if prompt_sets:
        extra_eval = functools.partial(true_score_lib.evaluate_sets, model=model,
                                       tokenizer=tokenizer, template=template,
                                       prompt_sets=prompt_sets, eval_cfg=config.eval,
                                       max_turns=int(config.chat.max_turns),
                                       seed=int(config.seed), mesh=mesh)

    def init_params_boxed(rng):
        return model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]

    task = loop.SupervisedTask(
        name="sft", init_params_boxed=init_params_boxed, loss_fn=lm_loss_fn(model),
        make_train_batches=lambda: batches("train", seed=int(config.seed)),
        make_eval_batches=lambda: batches("eval", seed=0, num_epochs=1, shuffle=False),
        load_initial_params=lambda: common.load_transformer_params(config.init_from, model_cfg, mesh),
        extra_eval=extra_eval, tokens_per_batch=batch_size * seq_len)
    common.write_run_info(workdir, "sft", model_cfg)
    return loop.run_supervised(task, config.train, mesh, workdir, seed=int(config.seed))

