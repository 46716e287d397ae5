"""Token-by-token decoding of one conversation with a KV cache, for streaming to a person.

The rollout engine (rlhf/rollout.py) runs a whole batch inside one jitted while-loop and
returns when every row has ended; a chat needs each token the moment it exists. Here the
prefill and the single-token step are separate jitted functions, and the host loop between
them yields each sampled token. The cache is allocated once per prompt-length bucket, so a
conversation compiles a few times at most, not once per turn.

Letters: P prompt slots (a bucket, left-padded), N new tokens, S = P + N cache slots,
V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from instructjax.model import cache as cache_lib
from instructjax.model.transformer import Transformer
from instructjax.rlhf.rollout import filter_logits

# Prompts are left-padded to a multiple of this many slots: one compiled prefill per bucket.
PROMPT_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """How each next token is chosen.

    temperature: > 0, logits are divided by it; top_k: keep the k most likely (0 = all);
    top_p: nucleus mass kept (1.0 = all); greedy: argmax instead of drawing;
    max_new_tokens: N, tokens per answer at most.
    """
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    greedy: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use greedy for argmax), got "
                             f"{self.temperature}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={self.top_k}, "
                             f"top_p={self.top_p}")


@dataclasses.dataclass
class StreamStats:
    """What one answer cost: prompt tokens, new tokens (EOS not counted), prefill seconds
    (which also sample the first token), and the decode steps after it with their seconds."""
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    decode_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed: tokens sampled by single-token steps per second of those steps."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


def _choose(logits_V, key, options: SamplingOptions):
    """One token id (int32 scalar) from float32 logits [V]."""
    if options.greedy:
        return jnp.argmax(logits_V).astype(jnp.int32)
    scaled_V = logits_V.astype(jnp.float32) / options.temperature
    return jax.random.categorical(key, filter_logits(scaled_V, options.top_k,
                                                     options.top_p)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill(model, params, tokens_1P, mask_1P, key, options, cache):
    """Writes the prompt into the cache; returns (first new token int32 [], cache)."""
    positions_1P = jnp.maximum(jnp.cumsum(mask_1P, axis=1) - 1, 0).astype(jnp.int32)
    kv_mask_1S = jnp.concatenate(
        [mask_1P, jnp.ones((1, cache.max_len - mask_1P.shape[1]), jnp.int32)], axis=1)
    logits_1PV, cache = model.apply({"params": params}, tokens_1P, positions_1P, cache, 0,
                                    kv_mask_1S, method="decode")
    return _choose(logits_1PV[0, -1], key, options), cache


@functools.partial(jax.jit, static_argnums=(0, 7), donate_argnums=(2,))
def _step(model, params, cache, token, position, slot, kv_mask_1S, options, key):
    """Feeds `token` at `slot` (RoPE `position`); returns (next token int32 [], cache)."""
    logits_11V, cache = model.apply({"params": params}, token.reshape(1, 1),
                                    position.reshape(1, 1), cache, slot, kv_mask_1S,
                                    method="decode")
    return _choose(logits_11V[0, 0], key, options), cache


class StreamingDecoder:
    """Streams the answer to one prompt, token by token, from a Transformer with a KV cache.

    Args:
        model_cfg: the ModelConfig of `params`.
        params: Transformer params (any placement jit accepts).
        eos_ids: ids that end an answer (kept out of the yielded tokens).
    """

    def __init__(self, model_cfg, params, eos_ids: Sequence[int]):
        self.model = Transformer(model_cfg)
        self.params = params
        self.eos_ids = frozenset(int(e) for e in eos_ids)

    @property
    def max_seq_len(self) -> int:
        """Prompt + answer slots the model supports."""
        return self.model.cfg.max_seq_len

    def stream(self, prompt_ids: Sequence[int], options: SamplingOptions, *, seed: int = 0,
               stats: StreamStats | None = None) -> Iterator[int]:
        """Yields the answer's token ids as they are sampled (EOS ends it, not yielded).

        Args:
            prompt_ids: the prompt's ids (BOS included where the model uses one); with
                options.max_new_tokens it must fit cfg.max_seq_len.
            options: SamplingOptions.
            seed: the answer's draws use fold_in(key(seed), i) for token i.
            stats: filled in (token counts, prefill / decode seconds) when given.
        """
        P, N = len(prompt_ids), options.max_new_tokens
        if P == 0:
            raise ValueError("the prompt holds no tokens")
        bucket = min(-(-P // PROMPT_BUCKET) * PROMPT_BUCKET, self.max_seq_len - N)
        if P > bucket:
            raise ValueError(f"prompt of {P} tokens + max_new_tokens {N} exceeds the model's "
                             f"max_seq_len={self.max_seq_len}")
        tokens = np.zeros((1, bucket), np.int32)
        mask = np.zeros((1, bucket), np.int32)
        tokens[0, bucket - P:], mask[0, bucket - P:] = prompt_ids, 1
        stats = stats if stats is not None else StreamStats()
        stats.prompt_tokens = P
        key = jax.random.key(seed)
        cache = cache_lib.init_cache(self.model.cfg, 1, bucket + N - 1) if N > 1 else \
            cache_lib.init_cache(self.model.cfg, 1, bucket)
        kv_mask = jnp.asarray(np.concatenate([mask, np.ones((1, cache.max_len - bucket),
                                                            np.int32)], axis=1))
        start = time.perf_counter()
        token, cache = _prefill(self.model, self.params, jnp.asarray(tokens), jnp.asarray(mask),
                                jax.random.fold_in(key, 0), options, cache)
        token_id = int(token)  # waits for the prefill
        stats.prefill_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for i in range(1, N + 1):
            if token_id in self.eos_ids:
                break
            stats.new_tokens = i
            yield token_id
            if i == N:
                break
            token, cache = _step(self.model, self.params, cache, token, jnp.int32(P + i - 1),
                                 jnp.int32(bucket + i - 1), kv_mask, options,
                                 jax.random.fold_in(key, i))
            token_id = int(token)
            stats.decode_steps = i
            stats.decode_seconds = time.perf_counter() - start
