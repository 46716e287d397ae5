"""Sampling responses from a policy with a KV cache.

`generate` left-pads nothing itself: it takes prompts already left-padded (pad on the left,
mask 0 there), so every row's last prompt token sits in the same column and all rows share
one cache write index. It runs one forward pass over the prompts (the prefill, which fills
the cache), then a `lax.while_loop` of one-token steps that stops as soon as every row has
emitted EOS. RoPE positions come from the mask (cumsum(mask) - 1), so a prompt's tokens get
the same positions whatever its amount of padding, and padding slots are hidden from
attention by the cache's key mask.

Log-probs: `Rollout.logprobs` is log softmax(logits / temperature) at each sampled token,
over the FULL vocabulary, i.e. before any top-k / top-p filtering. That is the distribution
PPO recomputes from the finished sequences in one uncached pass: rlhf/experience.py applies
`actor_critic.response_logprobs` to the logits of `actor_critic.forward` (old and updated
log-probs) and of the reference model (OpenAI's lm-human-preferences and TRL do the same),
so the PPO ratio starts at exactly 1 up to float error; filtering only decides which tokens
can be drawn. Greedy decoding records the same temperature-scaled log-probs.

Sharding: called inside `parallel.mesh.activate(mesh)`, the whole rollout runs on the mesh:
rows (prompts, samples, the KV cache and every per-row buffer) are split over the batch axes
(data, fsdp) and the cache's kv heads over the tensor axis, through the logical names of
model/cache.py and the model's own constraints. The prompts may be global jax.Arrays (one
batch assembled from every process) or host arrays holding the same values on every process.
Outside an active mesh the constraints vanish and it runs on one device.

Letters: B prompts, R = B * num_samples rows, P prompt length, N max new tokens,
S = P + N sequence length, V vocab.
"""
import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from instructjax.model import cache as cache_lib
from instructjax.parallel.mesh import shard_rows
# The one definition of left-padding positions (cumsum(mask) - 1, clipped at 0), shared with
# the reward model's scoring so sampling, log-probs and scores all see the same positions.
from instructjax.rlhf.scoring import positions_from_mask


@flax.struct.dataclass
class Rollout:
    """Sampled sequences, all rows aligned (row b * num_samples + j is sample j of prompt b).

    Attributes:
        tokens: int32 [R, P + N], the left-padded prompt then the response.
        mask: int32 [R, P + N], 1 on real prompt tokens and on response tokens up to and
            including the first EOS; 0 on padding (left of the prompt, after the EOS).
        response: int32 [R, N], the sampled tokens; pad_id after the first EOS.
        response_mask: int32 [R, N], 1 up to and including the first EOS, else 0.
        logprobs: float32 [R, N], log-prob of each response token under
            softmax(logits / temperature) over the full vocabulary; 0 where response_mask is 0.
        ended: bool [R], the row emitted EOS within the N tokens.
        response_length: int32 [R], number of response tokens counted by response_mask
            (the EOS included; N when the row did not end).
    """

    tokens: jax.Array
    mask: jax.Array
    response: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    ended: jax.Array
    response_length: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How answers are drawn: the static options of `generate` (converted once from a config).

    Attributes:
        max_new_tokens: N >= 1, response tokens per row at most.
        temperature: > 0; logits are divided by it before filtering and log-probs.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set of tokens with this much probability (1.0 = all).
        num_samples: answers per prompt (rows b * n + j).
    """
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1

    def options(self, **overrides) -> dict:
        """The keyword arguments of `generate` this config sets, with `overrides` applied."""
        return {**dataclasses.asdict(self), **overrides}


def filter_logits(logits, top_k=0, top_p=1.0):
    """Top-k, then top-p (nucleus) filtering: removed entries become -inf.

    Apply it to temperature-scaled logits (the order of Hugging Face's samplers:
    temperature, top-k, top-p).

    Args:
        logits: float [..., V].
        top_k: keep exactly the k largest entries (ties broken by lower index); 0 or k >= V
            keeps all. Static.
        top_p: keep the smallest set of largest-probability entries whose probability
            (under the softmax of the top-k-filtered logits) sums to at least top_p; the
            largest entry is always kept. 1.0 keeps all. Static. The boundary test runs on
            float32 cumulative sums, so a set whose mass equals top_p exactly may gain or
            lose its last member to rounding.

    Returns:
        float [..., V] in logits.dtype, the kept entries unchanged.
    """
    V = logits.shape[-1]
    removed = jnp.array(-jnp.inf, logits.dtype)
    if 0 < top_k < V:
        _, top_idx = jax.lax.top_k(logits, top_k)
        keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), top_idx, True, axis=-1,
                                  inplace=False)
        logits = jnp.where(keep, logits, removed)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1, stable=True)
        probs_sorted = jnp.take_along_axis(jax.nn.softmax(logits.astype(jnp.float32), axis=-1),
                                           order, axis=-1)
        # Entry i is needed while the mass of the entries before it is still short of top_p:
        # exactly the minimal nucleus, and never empty (the first has 0 mass before it).
        mass_before = jnp.cumsum(probs_sorted, axis=-1) - probs_sorted
        keep = jnp.put_along_axis(jnp.zeros(logits.shape, bool), order, mass_before < top_p,
                                  axis=-1, inplace=False)
        logits = jnp.where(keep, logits, removed)
    return logits


def eos_array(eos_id):
    """The end-of-sequence ids as int32 [E]: from one int, a sequence of ints or an array.

    Families end text in more than one way (LLaMA 3 instruct ends a turn with <|eot_id|>
    and a text with <|end_of_text|>); a row ends at the first of any of them.
    """
    return jnp.atleast_1d(jnp.asarray(eos_id, jnp.int32))


def is_eos(tokens, eos_id):
    """bool, tokens' shape: whether each token is one of the EOS ids (int, sequence or [E])."""
    eos_E = eos_array(eos_id)
    return jnp.any(tokens[..., None] == eos_E, axis=-1)


def mask_after_eos(response, eos_id):
    """Which response tokens count: those up to and including each row's first EOS.

    Args:
        response: int [B, N] tokens.
        eos_id: an int, a sequence of ints or an int array [E] (any of them ends a row);
            may be traced.

    Returns:
        (response_mask int32 [B, N], response_length int32 [B], ended bool [B]): ended says
        whether the row holds an EOS; length is the first EOS's index + 1, or N.
    """
    N = response.shape[1]
    eos_BN = is_eos(response, eos_id)
    ended = jnp.any(eos_BN, axis=1)
    length = jnp.where(ended, jnp.argmax(eos_BN, axis=1) + 1, N).astype(jnp.int32)
    response_mask = (jnp.arange(N)[None, :] < length[:, None]).astype(jnp.int32)
    return response_mask, length, ended


def _sample(logits_RV, key, *, temperature, top_k, top_p, greedy):
    """One token per row and its log-prob under the temperature-scaled full softmax.

    Returns (token int32 [R], logprob float32 [R]).
    """
    scaled_RV = logits_RV.astype(jnp.float32) / temperature
    if greedy:
        token_R = jnp.argmax(scaled_RV, axis=-1)
    else:
        token_R = jax.random.categorical(key, filter_logits(scaled_RV, top_k, top_p), axis=-1)
    token_R = token_R.astype(jnp.int32)
    logprob_R = jnp.take_along_axis(jax.nn.log_softmax(scaled_RV, axis=-1), token_R[:, None],
                                    axis=-1)[:, 0]
    return token_R, logprob_R


@functools.partial(jax.jit, static_argnums=0, static_argnames=(
    "max_new_tokens", "temperature", "top_k", "top_p", "greedy", "num_samples"))
def _generate(model, params, prompt_tokens, prompt_mask, rng, eos_id, pad_id, *,
              max_new_tokens, temperature, top_k, top_p, greedy, num_samples):
    """generate's jitted body; returns (Rollout, number of forward passes run)."""
    P, N = prompt_tokens.shape[1], max_new_tokens
    sample = functools.partial(_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                               greedy=greedy)
    tokens_RP = shard_rows(jnp.repeat(prompt_tokens.astype(jnp.int32), num_samples, axis=0))
    mask_RP = shard_rows(jnp.repeat(prompt_mask.astype(jnp.int32), num_samples, axis=0))
    R = tokens_RP.shape[0]
    prompt_len_R = jnp.sum(mask_RP, axis=1)

    # The last sampled token is never fed back, so P + N - 1 slots hold everything read.
    # Response slots are all marked real: a row's tokens after its EOS are only seen by that
    # row's own later (discarded) steps.
    cache = cache_lib.constrain(cache_lib.init_cache(model.cfg, R, P + N - 1))
    kv_mask_RS = shard_rows(jnp.concatenate([mask_RP, jnp.ones((R, N - 1), jnp.int32)], axis=1))

    def decode(tokens_RT, positions_RT, cache, cache_index):
        return model.apply({"params": params}, tokens_RT, positions_RT, cache, cache_index,
                           kv_mask_RS, method="decode")

    logits_RPV, cache = decode(tokens_RP, positions_from_mask(mask_RP), cache, 0)
    token_R, logprob_R = sample(logits_RPV[:, -1], jax.random.fold_in(rng, 0))
    response_RN = shard_rows(jnp.full((R, N), pad_id, jnp.int32).at[:, 0].set(token_R))
    logprobs_RN = shard_rows(jnp.zeros((R, N), jnp.float32).at[:, 0].set(logprob_R))
    state = (jnp.int32(1), cache, token_R, is_eos(token_R, eos_id), response_RN, logprobs_RN)

    def not_done(state):
        i, _, _, ended_R, _, _ = state
        return (i < N) & ~jnp.all(ended_R)

    def step(state):
        # Feeds token i - 1 (slot P + i - 1, position prompt_len + i - 1) and samples token i.
        i, cache, last_R, ended_R, response_RN, logprobs_RN = state
        logits_R1V, cache = decode(last_R[:, None], (prompt_len_R + i - 1)[:, None], cache,
                                   P + i - 1)
        token_R, logprob_R = sample(logits_R1V[:, 0], jax.random.fold_in(rng, i))
        token_R = jnp.where(ended_R, pad_id, token_R)
        logprob_R = jnp.where(ended_R, 0.0, logprob_R)
        response_RN = shard_rows(jax.lax.dynamic_update_slice(response_RN, token_R[:, None],
                                                              (0, i)))
        logprobs_RN = shard_rows(jax.lax.dynamic_update_slice(logprobs_RN, logprob_R[:, None],
                                                              (0, i)))
        cache = cache_lib.constrain(cache)
        return i + 1, cache, token_R, ended_R | is_eos(token_R, eos_id), response_RN, logprobs_RN

    num_steps, _, _, _, response_RN, logprobs_RN = jax.lax.while_loop(not_done, step, state)

    response_mask_RN, length_R, ended_R = mask_after_eos(response_RN, eos_id)
    rollout = Rollout(
        tokens=jnp.concatenate([tokens_RP, response_RN], axis=1),
        mask=jnp.concatenate([mask_RP, response_mask_RN], axis=1),
        response=response_RN,
        response_mask=response_mask_RN,
        logprobs=jnp.where(response_mask_RN == 1, logprobs_RN, 0.0),
        ended=ended_R,
        response_length=length_R)
    return rollout, num_steps


def generate(model, params, prompt_tokens, prompt_mask, rng, *, max_new_tokens,
             temperature=1.0, top_k=0, top_p=1.0, greedy=False, eos_id, pad_id,
             num_samples=1, return_num_steps=False):
    """Samples up to max_new_tokens per row after left-padded prompts, with a KV cache.

    Compiled once per (model, shapes, static options); callable inside another jit.

    Args:
        model: a Transformer (model/transformer.py), or any module with a `cfg` and a
            `decode` method like Transformer.decode; static (hashable).
        params: its params.
        prompt_tokens: int32 [B, P], left-padded with pad_id; each row needs at least one
            real token (e.g. BOS), and P + max_new_tokens <= model.cfg.max_seq_len.
        prompt_mask: int or bool [B, P], 1 on real prompt tokens (a suffix of each row).
        rng: PRNG key; step i draws with fold_in(rng, i), rows independently.
        max_new_tokens: N >= 1; static.
        temperature: > 0, logits are divided by it before filtering and log-probs; static.
        top_k, top_p: filters applied before drawing (see filter_logits); static.
        greedy: take the argmax instead of drawing (filters and rng unused); static.
        eos_id: the id that ends a row (kept, counted in the mask), or several (a sequence
            of ints or an int array [E]: a row ends at the first of any); may be traced.
        pad_id: int written after a row's EOS; it must differ from every EOS id (checked
            when both are concrete). May be traced.
        num_samples: n >= 1 samples per prompt, rows b * n + j; static.
        return_num_steps: also return the number of forward passes run (the prefill plus
            one per decode step; fewer than N when every row ended early), e.g. for the
            rollout tokens/s log.

    Returns:
        Rollout with R = B * num_samples rows, or (Rollout, int32 scalar) with
        return_num_steps.
    """
    cfg = model.cfg
    B, P = prompt_tokens.shape
    if prompt_mask.shape != (B, P):
        raise ValueError(f"prompt_mask {prompt_mask.shape} must match prompt_tokens {(B, P)}")
    if max_new_tokens < 1 or num_samples < 1:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) and num_samples ({num_samples}) "
                         "must be >= 1")
    if P + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt length {P} + max_new_tokens {max_new_tokens} exceeds "
                         f"cfg.max_seq_len={cfg.max_seq_len}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use greedy=True for argmax), "
                         f"got {temperature}")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={top_k}, "
                         f"top_p={top_p}")
    _check_pad_not_eos(pad_id, eos_id)
    rollout, num_steps = _generate(
        model, params, prompt_tokens, prompt_mask, rng, eos_array(eos_id), pad_id,
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
        top_p=float(top_p), greedy=bool(greedy), num_samples=num_samples)
    return (rollout, num_steps) if return_num_steps else rollout


def _check_pad_not_eos(pad_id, eos_id):
    """Refuses a pad id equal to an EOS id (PPO-DETAILS: padding after a row's end would
    read as more EOS tokens). Traced ids (generate inside a jit) are checked by the caller."""
    if isinstance(pad_id, jax.core.Tracer) or isinstance(eos_id, jax.core.Tracer):
        return
    eos = [int(e) for e in np.atleast_1d(np.asarray(eos_id))]
    if int(pad_id) in eos:
        raise ValueError(f"pad_id {int(pad_id)} equals an EOS id {eos}: padding written after "
                         "a row's end would read as more EOS tokens; give the tokenizer a "
                         "distinct pad id")
