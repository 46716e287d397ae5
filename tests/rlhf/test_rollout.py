"""Rollouts: filtering on hand-computed cases, EOS masking, greedy decoding against an
uncached argmax loop, left-padding invariance, sampling log-probs against the log-probs PPO
recomputes (actor_critic.forward + response_logprobs), per-sequence stop and the loop's
early exit."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax.model import transformer as tm
from instructjax.model.config import ModelConfig
from instructjax.rlhf import actor_critic as ac
from instructjax.rlhf import rollout as rl

# The model tests' tiny config: GQA (4 query heads on 2 kv heads), qkv bias, untied head.
CFG = ModelConfig(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=48, max_seq_len=32, qkv_bias=True, tie_embeddings=False)
MODEL = tm.Transformer(CFG)
PAD, BOS, EOS = 0, 2, 3
P, N = 8, 10
# Cached decoding and the uncached forward pass agree to ~2e-6 on the logits (see
# tests/model/test_cache.py); the log-probs, at temperatures 0.7 and 1, were measured within
# 1.5e-6. 1e-5 leaves ~7x headroom, while a wrong position, slot or temperature moves
# log-probs by 1e-2 or more.
LOGPROB_TOL = dict(atol=1e-5, rtol=0)


@functools.lru_cache(maxsize=None)
def params():
    return tm.init_params(CFG, jax.random.key(0))


AC_MODEL = ac.make_actor_critic("shared", CFG)


@functools.lru_cache(maxsize=None)
def ac_params():
    """The policy-with-value params PPO trains: params() as the trunk, a fresh value head."""
    fresh = nn.meta.unbox(tm.init_boxed_params(AC_MODEL, jax.random.key(0)))
    return {**fresh, "trunk": params()}


@functools.partial(jax.jit, static_argnums=(2,))
def ppo_logprobs(tokens, mask, temperature):
    """PPO's recomputation of the response tokens' log-probs and entropies, float32 [R, N]
    each: one uncached pass of the policy-with-value model (actor_critic.forward), scored by
    actor_critic.response_logprobs, as rlhf/experience.py runs it."""
    logits, _ = ac.forward(AC_MODEL, ac_params(), tokens, mask)
    return ac.response_logprobs(logits, tokens, P, temperature)


def left_pad(rows, width):
    """int32 tokens [B, width] and mask for lists of token ids, padded on the left."""
    tokens = np.full((len(rows), width), PAD, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        tokens[b, width - len(row):] = row
        mask[b, width - len(row):] = 1
    return jnp.asarray(tokens), jnp.asarray(mask)


PROMPTS = [[BOS, 17, 40, 9, 33, 58], [BOS, 5, 12, 44, 27, 8, 51, 19], [BOS, 30, 6]]


def greedy(prompt_tokens, prompt_mask, eos_id=EOS):
    return rl.generate(MODEL, params(), prompt_tokens, prompt_mask, jax.random.key(0),
                       max_new_tokens=N, greedy=True, eos_id=eos_id, pad_id=PAD,
                       return_num_steps=True)


# ---------------------------------------------------------------- pure functions

def test_top_k_keeps_exactly_k():
    logits = jnp.array([[0.1, 2.0, -1.0, 2.0, 0.5],
                        [1.0, 1.0, 1.0, 0.0, 1.0]])
    kept = np.isfinite(np.asarray(rl.filter_logits(logits, top_k=3)))
    np.testing.assert_array_equal(kept[0], [False, True, False, True, True])
    # Four-way tie at the top: exactly 3 survive, the lowest indices.
    np.testing.assert_array_equal(kept[1], [True, True, True, False, False])
    out = np.asarray(rl.filter_logits(logits, top_k=3))
    np.testing.assert_array_equal(out[kept], np.asarray(logits)[kept])
    assert np.all(out[~kept] == -np.inf)
    np.testing.assert_array_equal(rl.filter_logits(logits, top_k=0), logits)
    np.testing.assert_array_equal(rl.filter_logits(logits, top_k=5), logits)


@pytest.mark.parametrize("top_p,expected", [
    (0.4, [False, True, False, False]),   # 0.5 alone already covers 0.4
    (0.6, [False, True, False, True]),    # 0.5 + 0.25
    (0.8, [True, True, False, True]),     # + one of the tied 0.125s (the lower index)
    (0.9, [True, True, True, True]),
    (1.0, [True, True, True, True]),
])
def test_top_p_keeps_the_minimal_nucleus(top_p, expected):
    # Probabilities 0.125, 0.5, 0.125, 0.25, deliberately out of order; a batch dim in
    # front to check that filtering runs on the last axis.
    logits = jnp.log(jnp.array([[[0.125, 0.5, 0.125, 0.25]]]))
    kept = np.isfinite(np.asarray(rl.filter_logits(logits, top_p=top_p)))[0, 0]
    np.testing.assert_array_equal(kept, expected)


def test_top_p_applies_to_the_top_k_distribution():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.125, 0.125]]))
    # Alone, top-p 0.6 keeps 0.5 and 0.25; after top-2 they renormalise to 2/3 and 1/3, and
    # 2/3 already covers 0.6.
    alone = np.isfinite(np.asarray(rl.filter_logits(logits, top_p=0.6)))
    both = np.isfinite(np.asarray(rl.filter_logits(logits, top_k=2, top_p=0.6)))
    np.testing.assert_array_equal(alone[0], [True, True, False, False])
    np.testing.assert_array_equal(both[0], [True, False, False, False])


def test_mask_after_eos():
    response = jnp.array([[5, EOS, PAD, PAD],     # ends at 1
                          [5, 6, 7, 8],           # never ends
                          [EOS, 9, EOS, PAD],     # first EOS counts
                          [PAD, 4, 5, EOS]])      # a sampled pad id is a real token
    mask, length, ended = rl.mask_after_eos(response, EOS)
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0],
                                         [1, 1, 1, 1]])
    np.testing.assert_array_equal(length, [2, 4, 1, 4])
    np.testing.assert_array_equal(ended, [True, False, True, True])
    assert mask.dtype == jnp.int32 and length.dtype == jnp.int32


def test_positions_from_mask():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(rl.positions_from_mask(mask), [[0, 0, 0, 1, 2],
                                                                 [0, 1, 2, 3, 3]])


def test_generate_rejects_bad_options():
    tokens, mask = left_pad(PROMPTS, P)
    call = functools.partial(rl.generate, MODEL, params(), tokens, mask, jax.random.key(0),
                             eos_id=EOS, pad_id=PAD)
    with pytest.raises(ValueError, match="max_seq_len"):
        call(max_new_tokens=CFG.max_seq_len - P + 1)
    with pytest.raises(ValueError, match="temperature"):
        call(max_new_tokens=N, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        call(max_new_tokens=N, top_p=0.0)


# ---------------------------------------------------------------- decoding

@functools.lru_cache(maxsize=None)
def uncached_logits_fn():
    """Jitted full forward over [B, P + N] with positions and segments from the mask."""
    return jax.jit(lambda p, x, m: MODEL.apply({"params": p}, x, rl.positions_from_mask(m), m))


def test_greedy_equals_uncached_argmax_step_by_step():
    tokens, mask = left_pad(PROMPTS, P)
    rollout, _ = greedy(tokens, mask)
    # Independent loop: one uncached forward over a [B, P + N] buffer per step, the tokens
    # not yet generated masked out (they are pad, segment 0), the argmax at the last real
    # column appended, each row stopped at its own EOS.
    buf = np.concatenate([np.asarray(tokens), np.full((3, N), PAD, np.int32)], axis=1)
    buf_mask = np.concatenate([np.asarray(mask), np.zeros((3, N), np.int32)], axis=1)
    logprobs = np.zeros((3, N), np.float32)
    alive = np.ones(3, bool)
    for i in range(N):
        logits = np.asarray(uncached_logits_fn()(params(), jnp.asarray(buf),
                                                 jnp.asarray(buf_mask)))[:, P + i - 1]
        token = logits.argmax(-1)
        logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
        for b in np.flatnonzero(alive):
            buf[b, P + i], buf_mask[b, P + i] = token[b], 1
            logprobs[b, i] = logp[b, token[b]]
            alive[b] = token[b] != EOS
    np.testing.assert_array_equal(rollout.tokens, buf)
    np.testing.assert_array_equal(rollout.mask, buf_mask)
    np.testing.assert_allclose(rollout.logprobs, logprobs, **LOGPROB_TOL)
    assert rollout.tokens.dtype == jnp.int32 and rollout.logprobs.dtype == jnp.float32


def test_left_padding_does_not_change_the_continuation():
    tokens, mask = left_pad(PROMPTS, P)
    more_tokens, more_mask = left_pad(PROMPTS, P + 3)
    rollout, _ = greedy(tokens, mask)
    padded, _ = greedy(more_tokens, more_mask)
    np.testing.assert_array_equal(padded.response, rollout.response)
    np.testing.assert_array_equal(padded.response_mask, rollout.response_mask)
    np.testing.assert_allclose(padded.logprobs, rollout.logprobs, **LOGPROB_TOL)
    np.testing.assert_array_equal(padded.tokens[:, 3:], rollout.tokens)


def test_sampled_logprobs_match_ppos_recomputation_and_samples_are_per_row():
    tokens, mask = left_pad(PROMPTS, P)
    n, temperature = 2, 0.7
    rollout = rl.generate(MODEL, params(), tokens, mask, jax.random.key(3), max_new_tokens=N,
                          temperature=temperature, eos_id=EOS, pad_id=PAD, num_samples=n)
    R = 3 * n
    assert rollout.tokens.shape == (R, P + N) and rollout.logprobs.shape == (R, N)
    # Row b * n + j is sample j of prompt b.
    np.testing.assert_array_equal(rollout.tokens[:, :P], np.repeat(tokens, n, axis=0))
    np.testing.assert_array_equal(rollout.mask[:, :P], np.repeat(mask, n, axis=0))
    response = np.asarray(rollout.response)
    for b in range(3):
        assert not np.array_equal(response[b * n], response[b * n + 1]), b
    # Every row follows the EOS rule, whether or not it ended.
    response_mask, length, ended = rl.mask_after_eos(rollout.response, EOS)
    np.testing.assert_array_equal(rollout.response_mask, response_mask)
    np.testing.assert_array_equal(rollout.response_length, length)
    np.testing.assert_array_equal(rollout.ended, ended)
    assert np.all(response[np.asarray(response_mask) == 0] == PAD)

    logprobs, entropy = ppo_logprobs(rollout.tokens, rollout.mask, temperature)
    logprobs, entropy = np.asarray(logprobs), np.asarray(entropy)
    real = np.asarray(rollout.response_mask) == 1
    np.testing.assert_allclose(np.asarray(rollout.logprobs)[real], logprobs[real], **LOGPROB_TOL)
    assert np.all(logprobs[real] < 0.0)
    assert np.all((entropy[real] > 0.0) & (entropy[real] <= np.log(CFG.vocab_size) + 1e-5))
    # After a row's EOS the sampler records nothing; PPO masks those tokens out.
    assert np.all(np.asarray(rollout.logprobs)[~real] == 0.0)


def test_top_k_one_sampling_is_greedy():
    tokens, mask = left_pad(PROMPTS, P)
    rollout, _ = greedy(tokens, mask)
    sampled = rl.generate(MODEL, params(), tokens, mask, jax.random.key(4), max_new_tokens=N,
                          top_k=1, eos_id=EOS, pad_id=PAD)
    np.testing.assert_array_equal(sampled.response, rollout.response)
    # Log-probs are those of the full softmax, not of the (one-token) filtered one.
    np.testing.assert_allclose(sampled.logprobs, rollout.logprobs, **LOGPROB_TOL)
    assert np.all(np.asarray(sampled.logprobs)[np.asarray(sampled.response_mask) == 1] < 0.0)


def test_each_row_stops_at_its_own_eos():
    tokens, mask = left_pad(PROMPTS, P)
    # Greedy continuations do not depend on the EOS id until a row stops, so an id the
    # model never emits gives the full continuations, and any token of them can then serve
    # as the EOS.
    free, steps = greedy(tokens, mask, eos_id=-1)
    assert int(steps) == N and not np.any(free.ended)
    assert np.all(np.asarray(free.response_length) == N)
    free_response = np.asarray(free.response)
    # An EOS that row 0 emits and some other row never does.
    eos = next(int(t) for t in free_response[0]
               if not all(np.any(row == t) for row in free_response[1:]))
    rollout, steps = greedy(tokens, mask, eos_id=eos)
    for b, row in enumerate(free_response):
        hits = np.flatnonzero(row == eos)
        length = hits[0] + 1 if len(hits) else N
        np.testing.assert_array_equal(rollout.response[b, :length], row[:length])
        assert np.all(np.asarray(rollout.response)[b, length:] == PAD)
        assert np.all(np.asarray(rollout.logprobs)[b, length:] == 0.0)
        np.testing.assert_array_equal(rollout.response_mask[b], np.arange(N) < length)
        assert bool(rollout.ended[b]) == bool(len(hits)), b
        assert int(rollout.response_length[b]) == length
    assert not np.all(rollout.ended) and np.any(rollout.ended)
    assert int(steps) == N


def test_loop_exits_once_every_row_has_ended():
    # The same prompt in every row: identical greedy rows that all end at the first
    # occurrence of the chosen EOS, here one of the first three tokens.
    tokens, mask = left_pad([PROMPTS[0]] * 3, P)
    free, _ = greedy(tokens, mask, eos_id=-1)
    eos = int(free.response[0, 2])
    first = int(np.flatnonzero(np.asarray(free.response[0]) == eos)[0])
    rollout, steps = greedy(tokens, mask, eos_id=eos)
    assert np.all(rollout.ended) and np.all(np.asarray(rollout.response_length) == first + 1)
    # One forward pass per sampled token: the prefill samples token 0 and each loop step
    # one more, so the loop stopped right after the last row's EOS instead of running to N.
    assert int(steps) == first + 1 < N


def test_ppo_update_logprobs_match_the_reference_forward_and_the_rollouts():
    """The log-probs PPO's update computes (actor_critic.forward + response_logprobs, through
    the policy-with-value model) equal the sampler's, and those the reference forward computes
    from the bare Transformer with the same params (rlhf/experience.make_reference_forward:
    apply with mask positions and segments, then response_logprobs), on the response tokens:
    the first minibatch's ratio is exactly what the rollout implies, and the KL to an
    unchanged reference is 0."""
    tokens, mask = left_pad(PROMPTS, P)
    temperature = 0.7
    rollout = rl.generate(MODEL, params(), tokens, mask, jax.random.key(5), max_new_tokens=N,
                          temperature=temperature, eos_id=EOS, pad_id=PAD, num_samples=2)
    update_logprobs, _ = ppo_logprobs(rollout.tokens, rollout.mask, temperature)
    ref_logits = uncached_logits_fn()(params(), rollout.tokens, rollout.mask)
    ref_logprobs, _ = ac.response_logprobs(ref_logits, rollout.tokens, P, temperature)
    real = np.asarray(rollout.response_mask) == 1
    np.testing.assert_allclose(np.asarray(update_logprobs)[real], np.asarray(ref_logprobs)[real],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(update_logprobs)[real],
                               np.asarray(rollout.logprobs)[real], **LOGPROB_TOL)


def test_several_eos_ids_end_a_row_at_the_first_of_any():
    # LLaMA 3 instruct ends a turn with <|eot_id|> and a text with <|end_of_text|>: a row
    # must stop at whichever comes first. Two ids taken from row 0's free continuation.
    tokens, mask = left_pad(PROMPTS, P)
    free, _ = greedy(tokens, mask, eos_id=-1)
    free_response = np.asarray(free.response)
    first_eos, second_eos = int(free_response[0, 4]), int(free_response[0, 7])
    rollout, _ = greedy(tokens, mask, eos_id=(second_eos, first_eos))
    for b, row in enumerate(free_response):
        hits = np.flatnonzero((row == first_eos) | (row == second_eos))
        length = hits[0] + 1 if len(hits) else N
        assert int(rollout.response_length[b]) == length, b
        np.testing.assert_array_equal(rollout.response[b, :length], row[:length])
        assert np.all(np.asarray(rollout.response)[b, length:] == PAD)
    mask_tuple, length_tuple, _ = rl.mask_after_eos(rollout.response, (first_eos, second_eos))
    np.testing.assert_array_equal(mask_tuple, rollout.response_mask)
    np.testing.assert_array_equal(length_tuple, rollout.response_length)


def test_a_pad_id_equal_to_an_eos_id_is_refused():
    tokens, mask = left_pad(PROMPTS, P)
    with pytest.raises(ValueError, match="pad_id 0 equals an EOS id"):
        rl.generate(MODEL, params(), tokens, mask, jax.random.key(0), max_new_tokens=N,
                    greedy=True, eos_id=(EOS, PAD), pad_id=PAD)
