"""The streaming decoder against the batch rollout engine and the uncached forward pass."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax.chat.engine import PROMPT_BUCKET, SamplingOptions, StreamingDecoder, StreamStats
from instructjax.model import transformer as tm
from instructjax.model.config import ModelConfig
from instructjax.rlhf import rollout as rl

CFG = ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=48, max_seq_len=160, qkv_bias=True, tie_embeddings=False)
PAD, BOS = 0, 2


@functools.lru_cache(maxsize=None)
def params():
    return tm.init_params(CFG, jax.random.key(0))


def _greedy_rollout(prompt, n, eos=-1):
    tokens = jnp.asarray([prompt], jnp.int32)
    mask = jnp.ones_like(tokens)
    out = rl.generate(tm.Transformer(CFG), params(), tokens, mask, jax.random.key(0),
                      max_new_tokens=n, greedy=True, eos_id=eos, pad_id=PAD)
    return [int(t) for t, m in zip(out.response[0], out.response_mask[0]) if m]


def test_greedy_stream_equals_the_rollout_engine_and_the_uncached_argmax():
    prompt = [BOS, 17, 40, 9, 33, 58, 5, 12]
    n = 20
    decoder = StreamingDecoder(CFG, params(), eos_ids=[-1])
    stats = StreamStats()
    streamed = list(decoder.stream(prompt, SamplingOptions(max_new_tokens=n, greedy=True),
                                   stats=stats))
    assert streamed == _greedy_rollout(prompt, n)
    # The uncached forward's argmax after prompt + streamed tokens, step by step.
    seq = list(prompt)
    for token in streamed:
        logits = tm.Transformer(CFG).apply({"params": params()}, jnp.asarray([seq]))
        assert int(jnp.argmax(logits[0, -1])) == token
        seq.append(token)
    assert stats.prompt_tokens == len(prompt) and stats.new_tokens == n
    assert stats.tokens_per_second > 0


def test_stream_stops_at_any_eos_and_does_not_yield_it():
    prompt = [BOS, 30, 6]
    free = _greedy_rollout(prompt, 12)
    eos = (free[5], free[9])
    decoder = StreamingDecoder(CFG, params(), eos_ids=eos)
    streamed = list(decoder.stream(prompt, SamplingOptions(max_new_tokens=12, greedy=True)))
    first = min(i for i, t in enumerate(free) if t in eos)
    assert streamed == free[:first]


def test_sampling_is_reproducible_by_seed_and_respects_top_k_one():
    prompt = [BOS, 5, 44, 27]
    decoder = StreamingDecoder(CFG, params(), eos_ids=[-1])
    sampled = SamplingOptions(max_new_tokens=10, temperature=1.0, top_p=1.0)
    a = list(decoder.stream(prompt, sampled, seed=3))
    assert a == list(decoder.stream(prompt, sampled, seed=3))
    assert a != list(decoder.stream(prompt, sampled, seed=4))
    top1 = SamplingOptions(max_new_tokens=10, temperature=1.0, top_k=1)
    assert list(decoder.stream(prompt, top1, seed=5)) == _greedy_rollout(prompt, 10)


def test_prompts_longer_than_the_context_are_refused():
    decoder = StreamingDecoder(CFG, params(), eos_ids=[-1])
    too_long = [BOS] * (CFG.max_seq_len - 8 + 1)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        list(decoder.stream(too_long, SamplingOptions(max_new_tokens=8, greedy=True)))
    # A prompt past one bucket still works (a second compiled bucket).
    long_prompt = [BOS] + [7] * PROMPT_BUCKET
    assert len(list(decoder.stream(long_prompt, SamplingOptions(max_new_tokens=4,
                                                                greedy=True)))) == 4
    with pytest.raises(ValueError, match="temperature"):
        SamplingOptions(temperature=0.0)
