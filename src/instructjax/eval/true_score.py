"""The demo task's true score of a policy: generate answers to held-out prompts, score them.

The score comes from `data.demo_task.score_responses` (answer correctness); training never sees
it. Reported for greedy decoding (`true_score`) and for sampling at the eval temperature
(`true_score_sampled`, `eval.num_samples` answers per prompt), plus the EOS rate of the
sampled answers; `evaluate_sets` reports several prompt sets under prefixed names.

With a mesh, generation runs sharded on it (see rlhf/rollout.py); every process passes the
same prompts and gets every answer back, so all processes compute the same score.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from instructjax.data import chat_encoding, demo_task, formats, packing
from instructjax.parallel import mesh as mesh_lib
from instructjax.rlhf import rollout


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The true-score eval's settings (converted once from `config.eval` and `config.chat`).

    Attributes:
        num_prompts: prompts of each eval set scored (the first ones of the file).
        batch_size: prompts per generation call (a short last batch is filled).
        max_prompt_len: P, prompts are left-padded / truncated to it.
        max_turns: earlier exchanges kept in a prompt at most.
        sampling: how sampled answers are drawn; `sampling.num_samples` answers per prompt
            give true_score_sampled (greedy answers ignore temperature and filters).
        seed: the eval's sampling seed (each eval step draws with seed + step + 1).
    """
    num_prompts: int
    batch_size: int
    max_prompt_len: int
    max_turns: int
    sampling: rollout.SamplingConfig
    seed: int = 0


def encode_prompts(prompts: Sequence[formats.Prompt], tokenizer,
                   template: chat_encoding.ChatTemplate, *, max_prompt_len: int,
                   max_turns: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> left-padded (tokens int32 [N, P], mask int32 [N, P]), P = max_prompt_len."""
    ids = [chat_encoding.encode_prompt(p, tokenizer, template, max_length=max_prompt_len,
                                       max_turns=max_turns) for p in prompts]
    return packing.left_pad(ids, tokenizer.pad_id, max_prompt_len)


def decode_responses(response: np.ndarray, response_mask: np.ndarray, tokenizer) -> list[str]:
    """Response token rows [N, R] -> texts, cut at the mask (EOS and padding dropped)."""
    texts = []
    for ids, keep in zip(np.asarray(response), np.asarray(response_mask)):
        ids = [int(t) for t, k in zip(ids, keep) if k and int(t) not in tokenizer.eos_ids]
        texts.append(tokenizer.decode(ids))
    return texts


def fetch(tree: Any) -> Any:
    """Host numpy copies of a pytree of arrays; on every process the whole global value.

    Arrays spread over several processes are all-gathered (a collective: every process must
    call it); others are copied from device.
    """
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))
    return jax.tree.map(one, tree)


def generate_texts(model, params, tokens: np.ndarray, mask: np.ndarray, tokenizer, *,
                   batch_size: int, sampling: rollout.SamplingConfig, greedy: bool, seed: int,
                   mesh=None) -> tuple[list[str], np.ndarray]:
    """Answers to left-padded prompts (int32 [N, P] tokens and mask), in batches of
    batch_size prompts; a short last batch is filled with copies of its first row
    (whose answers are dropped), so every batch has one shape. With `mesh`, each batch is
    generated sharded on it (the same prompts on every process).

    Returns (texts, ended bool [N * n]) with n = sampling.num_samples, answer j of prompt i
    at i * n + j; ended says the answer stopped with EOS.
    """
    texts, ended = [], []
    num_samples = sampling.num_samples
    rng = jax.random.key(seed)
    scope = mesh_lib.activate(mesh) if mesh is not None else contextlib.nullcontext()
    with scope:
        for start in range(0, len(tokens), batch_size):
            rng, key = jax.random.split(rng)
            rows = min(batch_size, len(tokens) - start)
            fill = np.full(batch_size - rows, start) if len(tokens) > batch_size else np.zeros(0, int)
            index = np.concatenate([np.arange(start, start + rows), fill]).astype(int)
            out = rollout.generate(
                model, params, tokens[index], mask[index], key,
                **sampling.options(greedy=greedy, eos_id=tokenizer.eos_ids, pad_id=tokenizer.pad_id))
            response, response_mask, out_ended = fetch((out.response, out.response_mask,
                                                        out.ended))
            kept = rows * num_samples
            texts += decode_responses(response[:kept], response_mask[:kept], tokenizer)
            ended += list(out_ended[:kept])
    return texts, np.asarray(ended, bool)


def evaluate(params, step: int, *, model, tokenizer, template: chat_encoding.ChatTemplate,
             prompts: Sequence[formats.Prompt], eval_cfg: EvalConfig, mesh=None
             ) -> dict[str, Any]:
    """{"true_score", "true_score_sampled", "eos_rate", "sample"} of `params` on `prompts`.

    true_score: mean over prompts of the greedy answer's score; true_score_sampled: mean over
    eval_cfg.sampling.num_samples answers per prompt sampled at its temperature (with the PPO
    temperature, the expected true score of the policy PPO optimises). With `mesh` (every
    process calling with the same prompts) generation is sharded on it and every process
    returns the same numbers.
    """
    tokens, mask = encode_prompts(prompts, tokenizer, template,
                                  max_prompt_len=eval_cfg.max_prompt_len,
                                  max_turns=eval_cfg.max_turns)
    generate = functools.partial(generate_texts, model, params, tokens, mask, tokenizer,
                                 batch_size=eval_cfg.batch_size, mesh=mesh)
    greedy_texts, _ = generate(sampling=dataclasses.replace(eval_cfg.sampling, num_samples=1),
                               greedy=True, seed=eval_cfg.seed)
    sampled_texts, ended = generate(sampling=eval_cfg.sampling, greedy=False,
                                    seed=eval_cfg.seed + step + 1)
    sampled_prompts = [p for p in prompts for _ in range(eval_cfg.sampling.num_samples)]
    return {
        "true_score": float(np.mean(demo_task.score_responses(prompts, greedy_texts))),
        "true_score_sampled": float(np.mean(demo_task.score_responses(sampled_prompts,
                                                                      sampled_texts))),
        "eos_rate": float(np.mean(ended)),
        "sample": f"{chat_encoding.render_prompt(prompts[0].context, template)}{greedy_texts[0]}",
    }


def evaluate_sets(params, step: int, *, prompt_sets: Mapping[str, Sequence[formats.Prompt]],
                  **kwargs) -> dict[str, Any]:
    """`evaluate` on each named prompt set, its keys prefixed with the set's name.

    Args:
        prompt_sets: metric prefix -> prompts, e.g. {"": in-distribution prompts,
            "heldout_": prompts of held-out problems} gives true_score, ...,
            heldout_true_score, ...
        kwargs: the other keyword arguments of `evaluate`.
    """
    results = {}
    for prefix, prompts in prompt_sets.items():
        results.update({prefix + key: value for key, value in
                        evaluate(params, step, prompts=prompts, **kwargs).items()})
    return results
