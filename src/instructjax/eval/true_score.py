"""The demo task's true score of a policy: generate answers to held-out prompts, score them.

The score comes from `data.demo.score_responses` (answer correctness); training never sees
it. Reported for greedy decoding (`true_score`) and for sampling at the eval temperature
(`true_score_sampled`), plus the EOS rate and mean response length of the samples.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from instructjax.data import demo, formats, pipeline
from instructjax.rlhf import rollout


def encode_prompts(prompts: Sequence[formats.Prompt], tokenizer, template: formats.ChatTemplate,
                   *, max_prompt_len: int, max_turns: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> left-padded (tokens int32 [N, P], mask int32 [N, P]), P = max_prompt_len."""
    ids = [formats.encode_prompt(p, tokenizer, template, max_length=max_prompt_len,
                                 max_turns=max_turns) for p in prompts]
    return pipeline.left_pad(ids, tokenizer.pad_id, max_prompt_len)


def decode_responses(response: np.ndarray, response_mask: np.ndarray, tokenizer) -> list[str]:
    """Response token rows [N, R] -> texts, cut at the mask (EOS and padding dropped)."""
    texts = []
    for ids, keep in zip(np.asarray(response), np.asarray(response_mask)):
        ids = [int(t) for t, k in zip(ids, keep) if k and t != tokenizer.eos_id]
        texts.append(tokenizer.decode(ids))
    return texts


def generate_texts(model, params, tokens: np.ndarray, mask: np.ndarray, tokenizer, *,
                   eval_cfg: Any, greedy: bool, seed: int) -> tuple[list[str], np.ndarray]:
    """Answers to left-padded prompts, in batches of eval_cfg.batch_size.

    Returns (texts, ended bool [N]) where ended says the answer stopped with EOS.
    """
    texts, ended = [], []
    batch = int(eval_cfg.batch_size)
    rng = jax.random.key(seed)
    for start in range(0, len(tokens), batch):
        rng, key = jax.random.split(rng)
        out = rollout.generate(
            model, params, tokens[start:start + batch], mask[start:start + batch], key,
            max_new_tokens=int(eval_cfg.max_new_tokens), temperature=float(eval_cfg.temperature),
            top_k=int(eval_cfg.top_k), top_p=float(eval_cfg.top_p), greedy=greedy,
            eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        out = jax.device_get(out)
        texts += decode_responses(out.response, out.response_mask, tokenizer)
        ended += list(np.asarray(out.ended))
    return texts, np.asarray(ended, bool)


def evaluate(params, step: int, *, model, tokenizer, template: formats.ChatTemplate,
             prompts: Sequence[formats.Prompt], eval_cfg: Any, max_turns: int,
             seed: int) -> dict[str, Any]:
    """{"true_score", "true_score_sampled", "eos_rate", "sample"} of `params` on `prompts`."""
    tokens, mask = encode_prompts(prompts, tokenizer, template,
                                  max_prompt_len=int(eval_cfg.max_prompt_len), max_turns=max_turns)
    greedy_texts, _ = generate_texts(model, params, tokens, mask, tokenizer, eval_cfg=eval_cfg,
                                     greedy=True, seed=seed)
    sampled_texts, ended = generate_texts(model, params, tokens, mask, tokenizer,
                                          eval_cfg=eval_cfg, greedy=False, seed=seed + step + 1)
    return {
        "true_score": float(np.mean(demo.score_responses(prompts, greedy_texts))),
        "true_score_sampled": float(np.mean(demo.score_responses(prompts, sampled_texts))),
        "eos_rate": float(np.mean(ended)),
        "sample": f"{formats.render_prompt(prompts[0].context, template)}{greedy_texts[0]}",
    }
