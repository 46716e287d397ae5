"""The demo task's true score of a policy: generate answers to held-out prompts, score them.

The score comes from `data.demo.score_responses` (answer correctness); training never sees
it. Reported for greedy decoding (`true_score`) and for sampling at the eval temperature
(`true_score_sampled`, `eval.num_samples` answers per prompt), plus the EOS rate of the
sampled answers; `evaluate_sets` reports several prompt sets under prefixed names.

With a mesh, generation runs sharded on it (see rlhf/rollout.py); every process passes the
same prompts and gets every answer back, so all processes compute the same score.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import contextlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from instructjax.data import chat_encoding, demo, formats, pipeline
from instructjax.parallel import mesh as mesh_lib
from instructjax.rlhf import rollout


def encode_prompts(prompts: Sequence[formats.Prompt], tokenizer,
                   template: chat_encoding.ChatTemplate, *, max_prompt_len: int,
                   max_turns: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> left-padded (tokens int32 [N, P], mask int32 [N, P]), P = max_prompt_len."""
    ids = [chat_encoding.encode_prompt(p, tokenizer, template, max_length=max_prompt_len,
                                       max_turns=max_turns) for p in prompts]
    return pipeline.left_pad(ids, tokenizer.pad_id, max_prompt_len)


def decode_responses(response: np.ndarray, response_mask: np.ndarray, tokenizer) -> list[str]:
    """Response token rows [N, R] -> texts, cut at the mask (EOS and padding dropped)."""
    texts = []
    for ids, keep in zip(np.asarray(response), np.asarray(response_mask)):
        ids = [int(t) for t, k in zip(ids, keep) if k and t != tokenizer.eos_id]
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
                   eval_cfg: Any, greedy: bool, seed: int, mesh=None, num_samples: int = 1
                   ) -> tuple[list[str], np.ndarray]:
    """Answers to left-padded prompts (int32 [N, P] tokens and mask), in batches of
    eval_cfg.batch_size prompts; a short last batch is filled with copies of its first row
    (whose answers are dropped), so every batch has one shape. With `mesh`, each batch is
    generated sharded on it (the same prompts on every process).

    Returns (texts, ended bool [N * num_samples]), answer j of prompt i at i * num_samples + j;
    ended says the answer stopped with EOS.
    """
    texts, ended = [], []
    batch = int(eval_cfg.batch_size)
    rng = jax.random.key(seed)
    scope = mesh_lib.activate(mesh) if mesh is not None else contextlib.nullcontext()
    with scope:
        for start in range(0, len(tokens), batch):
            rng, key = jax.random.split(rng)
            rows = min(batch, len(tokens) - start)
            fill = np.full(batch - rows, start) if len(tokens) > batch else np.zeros(0, int)
            index = np.concatenate([np.arange(start, start + rows), fill]).astype(int)
            out = rollout.generate(
                model, params, tokens[index], mask[index], key,
                max_new_tokens=int(eval_cfg.max_new_tokens),
                temperature=float(eval_cfg.temperature), top_k=int(eval_cfg.top_k),
                top_p=float(eval_cfg.top_p), greedy=greedy, eos_id=tokenizer.eos_id,
                pad_id=tokenizer.pad_id, num_samples=num_samples)
            response, response_mask, out_ended = fetch((out.response, out.response_mask,
                                                        out.ended))
            kept = rows * num_samples
            texts += decode_responses(response[:kept], response_mask[:kept], tokenizer)
            ended += list(out_ended[:kept])
    return texts, np.asarray(ended, bool)


def evaluate(params, step: int, *, model, tokenizer, template: chat_encoding.ChatTemplate,
             prompts: Sequence[formats.Prompt], eval_cfg: Any, max_turns: int,
             seed: int, mesh=None) -> dict[str, Any]:
    """{"true_score", "true_score_sampled", "eos_rate", "sample"} of `params` on `prompts`.

    true_score: mean over prompts of the greedy answer's score; true_score_sampled: mean over
    eval_cfg.num_samples answers per prompt sampled at eval_cfg.temperature (with the PPO
    temperature, the expected true score of the policy PPO optimises). With `mesh` (every
    process calling with the same prompts) generation is sharded on it and every process
    returns the same numbers.
    """
    tokens, mask = encode_prompts(prompts, tokenizer, template,
                                  max_prompt_len=int(eval_cfg.max_prompt_len), max_turns=max_turns)
    greedy_texts, _ = generate_texts(model, params, tokens, mask, tokenizer, eval_cfg=eval_cfg,
                                     greedy=True, seed=seed, mesh=mesh)
    num_samples = int(eval_cfg.num_samples)
    sampled_texts, ended = generate_texts(model, params, tokens, mask, tokenizer,
                                          eval_cfg=eval_cfg, greedy=False, seed=seed + step + 1,
                                          mesh=mesh, num_samples=num_samples)
    sampled_prompts = [p for p in prompts for _ in range(num_samples)]
    return {
        "true_score": float(np.mean(demo.score_responses(prompts, greedy_texts))),
        "true_score_sampled": float(np.mean(demo.score_responses(sampled_prompts, sampled_texts))),
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
