"""PPO's pure functions against plain-Python loops and hand-computed cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructjax.rlhf import actor_critic as ac
from instructjax.rlhf import kl as kl_lib
from instructjax.rlhf import ppo


def random_masked(seed, B=5, N=9):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, N + 1, size=B)
    lengths[0] = N  # one full row
    mask = (np.arange(N)[None] < lengths[:, None]).astype(np.float32)
    return rng, mask


def gae_loop(rewards, values, mask, gamma, lam):
    """The textbook recursion, one row at a time, only over the row's real tokens."""
    B, N = rewards.shape
    adv = np.zeros((B, N))
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_value = values[b, t + 1] if t + 1 < n else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, (adv + values) * mask


@pytest.mark.parametrize("seed,gamma,lam", [(0, 1.0, 0.95), (1, 0.99, 0.9), (2, 1.0, 1.0)])
def test_gae_matches_python_loop(seed, gamma, lam):
    rng, mask = random_masked(seed)
    rewards = rng.normal(size=mask.shape).astype(np.float32)
    values = rng.normal(size=mask.shape).astype(np.float32)
    # garbage beyond the mask must not leak in
    rewards_dirty = np.where(mask > 0, rewards, 100.0).astype(np.float32)
    values_dirty = np.where(mask > 0, values, -100.0).astype(np.float32)
    adv, ret = jax.jit(lambda r, v, m: ppo.gae(r, v, m, gamma=gamma, lam=lam))(
        rewards_dirty, values_dirty, mask)
    want_adv, want_ret = gae_loop(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(np.asarray(adv), want_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret), want_ret, rtol=1e-5, atol=1e-5)


def test_shaped_rewards_put_score_on_last_token():
    kl = jnp.array([[0.1, 0.2, 0.3, 0.0], [0.5, 0.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    r = ppo.shaped_rewards(kl, jnp.array([2.0, -1.0]), mask, jnp.float32(0.5))
    want = np.array([[-0.05, -0.1, -0.15 + 2.0, 0.0], [-0.25 - 1.0, 0, 0, 0]])
    np.testing.assert_allclose(np.asarray(r), want, rtol=1e-6)


def test_kl_estimators():
    logp = jnp.array([[-1.0, -2.0, -0.5]])
    ref = jnp.array([[-1.5, -1.0, -0.5]])
    mask = jnp.array([[1, 1, 0]])
    k1 = ppo.per_token_kl(logp, ref, mask, "k1")
    np.testing.assert_allclose(np.asarray(k1), [[0.5, -1.0, 0.0]], rtol=1e-6)
    k3 = ppo.per_token_kl(logp, ref, mask, "k3")
    want = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0]
    np.testing.assert_allclose(np.asarray(k3)[0], want, rtol=1e-6)
    assert float(jnp.min(k3)) >= 0.0
    huge = ppo.per_token_kl(jnp.array([[0.0]]), jnp.array([[-500.0]]), jnp.array([[1]]), "k3")
    assert np.isfinite(np.asarray(huge)).all()


def test_policy_loss_hand_computed():
    # ratios e^0.1 ~ 1.105 (inside clip), e^0.5 ~ 1.649 (clipped to 1.2 for A > 0),
    # e^-0.5 ~ 0.607 with A < 0 (the clipped term 0.8 * 1 is larger: loss uses it)
    old = jnp.zeros((1, 4))
    new = jnp.array([[0.1, 0.5, -0.5, 3.0]])
    adv = jnp.array([[1.0, 2.0, -1.0, 5.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    loss, stats = ppo.policy_loss(new, old, adv, mask, clip_eps=0.2)
    terms = [-1.0 * math.exp(0.1), -2.0 * 1.2, max(1.0 * math.exp(-0.5), 1.0 * 0.8)]
    np.testing.assert_allclose(float(loss), sum(terms) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(stats.clip_fraction), 2 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(stats.approx_kl), 0.5 * (0.01 + 0.25 + 0.25) / 3, rtol=1e-6)


def test_value_loss_hand_computed():
    old = jnp.array([[1.0, 1.0, 0.0]])
    new = jnp.array([[1.5, 0.9, 7.0]])
    ret = jnp.array([[2.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 0]])
    loss, clipfrac = ppo.value_loss(new, old, ret, mask, clip_eps=0.2)
    # token 0: unclipped (1.5-2)^2 = .25, clipped (1.2-2)^2 = .64 -> .64
    # token 1: unclipped .81, clipped (0.9-0)^2 = .81 (inside the clip range) -> .81
    np.testing.assert_allclose(float(loss), 0.5 * (0.64 + 0.81) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(clipfrac), 0.5, rtol=1e-6)


def test_whiten_and_explained_variance():
    rng, mask = random_masked(3)
    x = rng.normal(loc=3.0, scale=2.0, size=mask.shape).astype(np.float32)
    w = ppo.masked_whiten(x, mask)
    np.testing.assert_allclose(float(ppo.masked_mean(w, mask)), 0.0, atol=1e-5)
    np.testing.assert_allclose(float(ppo.masked_var(w, mask)), 1.0, rtol=1e-4)
    kept = ppo.masked_whiten(x, mask, shift_mean=False)
    np.testing.assert_allclose(float(ppo.masked_mean(kept, mask)),
                               float(ppo.masked_mean(x, mask)), rtol=1e-4)
    assert float(ppo.explained_variance(x, x, mask)) == pytest.approx(1.0)
    assert float(ppo.explained_variance(jnp.zeros_like(x), x - x.mean(), mask)) < 0.2


def test_process_scores_normalise_penalise_clip():
    raw = jnp.array([1.0, 2.0, 30.0])
    ended = jnp.array([True, False, True])
    s = ppo.process_scores(raw, ended, gain=2.0, bias=-1.0, clip=5.0, missing_eos_penalty=-1.0)
    np.testing.assert_allclose(np.asarray(s), [1.0, -1.0, 5.0])


def test_entropy_of_uniform_and_peaked():
    """The entropy (and log-probs) PPO logs and regularises with: actor_critic's
    response_logprobs, where the logits at column t score the token at column t + 1."""
    # Columns 0 and 1 score response tokens 1 and 2 (prompt length 1); the last column
    # predicts past the sequence and is not used.
    logits = jnp.stack([jnp.zeros(8), jnp.array([50.0] + [0.0] * 7), jnp.full(8, jnp.nan)])[None]
    tokens = jnp.array([[5, 3, 0]], jnp.int32)
    logprobs, ent = ac.response_logprobs(logits, tokens, 1, 1.0)
    np.testing.assert_allclose(np.asarray(ent)[0], [math.log(8), 0.0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(logprobs)[0], [-math.log(8), 0.0], atol=1e-5)


def test_adaptive_controller_formula():
    cfg = kl_lib.KLControllerConfig(kind="adaptive", init_coef=0.1, target=6.0, horizon=10000)
    state = kl_lib.init_controller(cfg)
    for kl_value, n in [(12.0, 64), (6.3, 64), (1.0, 128), (6.0, 32)]:
        error = min(max(kl_value / 6.0 - 1.0, -0.2), 0.2)
        want = float(state.kl_coef) * (1 + error * n / 10000)
        state = kl_lib.update_controller(cfg, state, jnp.float32(kl_value), n)
        np.testing.assert_allclose(float(state.kl_coef), want, rtol=1e-6)
    fixed = kl_lib.KLControllerConfig(kind="fixed", init_coef=0.05)
    s = kl_lib.update_controller(fixed, kl_lib.init_controller(fixed), jnp.float32(100.0), 64)
    assert float(s.kl_coef) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="valid"):
        kl_lib.KLControllerConfig(kind="pid")
