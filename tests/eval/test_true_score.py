"""The true-score eval's generation: several samples per prompt come back in prompt-major
order, and the filler rows of a short last batch are dropped."""

import jax
import numpy as np

from instructjax.eval import true_score as ts
from instructjax.model import transformer as tm
from instructjax.model.config import ModelConfig
from instructjax.rlhf import rollout

CFG = ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=48, max_seq_len=32)
PAD, EOS = 0, 3


class IdsTokenizer:
    """Decodes token ids to their decimal spelling, so texts identify token sequences."""
    pad_id, eos_id, eos_ids = PAD, EOS, (EOS,)

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def _prompts():
    rows = [[2, 17, 40, 9], [2, 5, 12, 44, 27], [2, 30, 6]]  # 3 prompts: batches of 2 + 1
    tokens = np.zeros((3, 6), np.int32)
    mask = np.zeros((3, 6), np.int32)
    for b, row in enumerate(rows):
        tokens[b, 6 - len(row):], mask[b, 6 - len(row):] = row, 1
    return tokens, mask


def _generate(greedy, num_samples, top_k=0):
    sampling = rollout.SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=top_k,
                                      top_p=1.0, num_samples=num_samples)
    tokens, mask = _prompts()
    return ts.generate_texts(tm.Transformer(CFG), tm.init_params(CFG, jax.random.key(0)),
                             tokens, mask, IdsTokenizer(), batch_size=2, sampling=sampling,
                             greedy=greedy, seed=0)


def test_samples_are_prompt_major_and_fillers_dropped():
    single, ended_single = _generate(greedy=True, num_samples=1)
    assert len(single) == 3 and ended_single.shape == (3,)
    assert len(set(single)) == 3  # distinct prompts, distinct continuations
    # top-k 1 sampling is greedy: each prompt's 3 samples are its greedy answer, in order
    sampled, ended = _generate(greedy=False, num_samples=3, top_k=1)
    assert ended.shape == (9,)
    assert sampled == [text for text in single for _ in range(3)]


def test_samples_of_one_prompt_differ_at_temperature_one():
    sampled, _ = _generate(greedy=False, num_samples=4)
    assert len(sampled) == 12
    assert any(len(set(sampled[4 * i:4 * i + 4])) > 1 for i in range(3))


def test_evaluate_sets_prefixes_each_sets_metrics(monkeypatch):
    seen = []

    def fake_evaluate(params, step, *, prompts, **kwargs):
        seen.append((params, step, tuple(prompts), kwargs))
        return {"true_score": float(len(prompts)), "sample": prompts[0]}

    monkeypatch.setattr(ts, "evaluate", fake_evaluate)
    out = ts.evaluate_sets("params", 7, prompt_sets={"": ["a", "b"], "heldout_": ["c"]},
                           seed=3)
    assert out == {"true_score": 2.0, "sample": "a", "heldout_true_score": 1.0,
                   "heldout_sample": "c"}
    assert seen == [("params", 7, ("a", "b"), {"seed": 3}), ("params", 7, ("c",), {"seed": 3})]
