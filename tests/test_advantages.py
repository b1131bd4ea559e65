"""Advantage estimators against plain-Python references and hand-computed cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.rl import advantages as adv_lib

RTOL = 1e-5
ATOL = 1e-6


# ----------------------------------------------------------------------------- references


def ref_gae(rewards, values, mask, gamma, lam):
    """GAE over the valid tokens of each row, laid end to end (gaps removed)."""
    batch, length = rewards.shape
    advantages = np.zeros((batch, length))
    returns = np.zeros((batch, length))
    for b in range(batch):
        idx = [t for t in range(length) if mask[b, t]]
        running = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            next_value = values[b, idx[j + 1]] if j + 1 < len(idx) else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            advantages[b, t] = running
            returns[b, t] = running + values[b, t]
    return advantages, returns


def ref_groups(group_ids):
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(group_ids):
        groups.setdefault(int(g), []).append(i)
    return groups


def ref_grpo(scores, group_ids, eps, normalize_std):
    out = np.zeros(len(scores))
    for members in ref_groups(group_ids).values():
        n = len(members)
        if n == 1:
            continue
        mean = sum(scores[i] for i in members) / n
        std = (sum((scores[i] - mean) ** 2 for i in members) / (n - 1)) ** 0.5
        for i in members:
            out[i] = (scores[i] - mean) / (std + eps) if normalize_std else scores[i] - mean
    return out


def ref_rloo(scores, group_ids):
    out = np.zeros(len(scores))
    for members in ref_groups(group_ids).values():
        n = len(members)
        if n == 1:
            continue
        for i in members:
            others = [scores[j] for j in members if j != i]
            out[i] = scores[i] - sum(others) / len(others)
    return out


def ref_whiten(x, mask, shift_mean, eps):
    vals = [x[b, t] for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    n = len(vals)
    mean = sum(vals) / n
    var = sum((v - mean) ** 2 for v in vals) / (n - 1)
    out = np.zeros_like(x, dtype=np.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                w = (x[b, t] - mean) / (var + eps) ** 0.5
                out[b, t] = w if shift_mean else w + mean
    return out


def multiturn_mask(rng, batch, length):
    """Rows of alternating user gaps and policy turns, plus an all-zero row."""
    mask = np.zeros((batch, length), np.float32)
    for b in range(batch - 1):
        t = int(rng.integers(0, 3))
        while t < length:
            turn = int(rng.integers(1, 5))
            mask[b, t : t + turn] = 1
            t += turn + int(rng.integers(1, 4))
    return mask


# ----------------------------------------------------------------------------- GAE


_gae = jax.jit(adv_lib.gae)


def test_gae_hand_gamma_lambda_one():
    rewards = jnp.array([[0.0, 0.0, 1.0]])
    values = jnp.array([[0.5, 0.6, 0.7]])
    mask = jnp.ones((1, 3))
    advantages, returns = _gae(rewards, values, mask, 1.0, 1.0)
    # A2 = 1 - 0.7; A1 = 0.7 - 0.6 + A2; A0 = 0.6 - 0.5 + A1; returns = rewards-to-go = 1.
    np.testing.assert_allclose(advantages, [[0.5, 0.4, 0.3]], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(returns, [[1.0, 1.0, 1.0]], rtol=RTOL, atol=ATOL)


def test_gae_hand_gap_is_transparent():
    # Position 1 is a user token: its reward (5) and value (9) must be ignored, and no
    # discount is spent on it. gamma = 0.5, lam = 1.
    rewards = jnp.array([[0.0, 5.0, 1.0]])
    values = jnp.array([[0.5, 9.0, 0.7]])
    mask = jnp.array([[1, 0, 1]])
    advantages, returns = _gae(rewards, values, mask, 0.5, 1.0)
    # A2 = 1 - 0.7 = 0.3; A0 = 0 + 0.5 * 0.7 - 0.5 + 0.5 * 0.3 = 0.0; R0 = 0.5 * 1.
    np.testing.assert_allclose(advantages, [[0.0, 0.0, 0.3]], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(returns, [[0.5, 0.0, 1.0]], rtol=RTOL, atol=ATOL)


def test_gae_gap_equals_compacted_sequence():
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(2, 4)).astype(np.float32)
    compact_adv, compact_ret = _gae(r[None], v[None], np.ones((1, 4)), 0.9, 0.8)
    # The same four policy tokens with user-token gaps (junk rewards and values) between.
    spread_r = np.array([[r[0], 7.0, 7.0, r[1], r[2], -3.0, r[3], 2.0]], np.float32)
    spread_v = np.array([[v[0], 4.0, 4.0, v[1], v[2], -1.0, v[3], 8.0]], np.float32)
    mask = np.array([[1, 0, 0, 1, 1, 0, 1, 0]])
    adv, ret = _gae(spread_r, spread_v, mask, 0.9, 0.8)
    keep = mask[0].astype(bool)
    np.testing.assert_allclose(adv[0, keep], compact_adv[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(ret[0, keep], compact_ret[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(np.asarray(adv)[0, ~keep], 0.0)
    np.testing.assert_array_equal(np.asarray(ret)[0, ~keep], 0.0)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.5, 0.0)])
def test_gae_matches_reference_random_multiturn(gamma, lam):
    rng = np.random.default_rng(1)
    batch, length = 5, 23
    rewards = rng.normal(size=(batch, length)).astype(np.float32)
    values = rng.normal(size=(batch, length)).astype(np.float32)
    mask = multiturn_mask(rng, batch, length)
    advantages, returns = jax.jit(adv_lib.gae)(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = ref_gae(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(advantages, ref_adv, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(returns, ref_ret, rtol=RTOL, atol=1e-5)
    assert advantages.shape == returns.shape == (batch, length)
    assert advantages.dtype == jnp.float32


def test_gae_outcome_reward_on_last_policy_token():
    # RLVER: one reward on the last policy token, gamma = lam = 1 and V = 0: every policy
    # token's advantage is the dialogue reward, user tokens get 0.
    mask = np.array([[0, 1, 1, 0, 0, 1, 1, 0]], np.float32)
    rewards = np.zeros_like(mask)
    rewards[0, 6] = 0.8
    advantages, _ = _gae(rewards, np.zeros_like(mask), mask, 1.0, 1.0)
    np.testing.assert_allclose(advantages, 0.8 * mask, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- whitening


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_matches_reference(shift_mean):
    rng = np.random.default_rng(2)
    x = (3.0 + 2.0 * rng.normal(size=(4, 9))).astype(np.float32)
    mask = multiturn_mask(rng, 4, 9)
    out = jax.jit(adv_lib.masked_whiten, static_argnames="shift_mean")(x, mask, shift_mean=shift_mean)
    np.testing.assert_allclose(out, ref_whiten(x, mask, shift_mean, 1e-8), rtol=RTOL, atol=1e-5)


def test_masked_whiten_hand():
    # Valid values 1, 3: mean 2, unbiased var 2.
    out = jax.jit(adv_lib.masked_whiten)(jnp.array([[1.0, 100.0, 3.0]]), jnp.array([[1, 0, 1]]), eps=0.0)
    s = 2.0**-0.5
    np.testing.assert_allclose(out, [[-s, 0.0, s]], rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- GRPO / RLOO


_grpo = jax.jit(adv_lib.grpo, static_argnames=("normalize_std", "num_groups"))


def test_grpo_hand():
    out = _grpo(jnp.array([1.0, 0.0, 0.5]), jnp.array([0, 0, 0]))
    # mean 0.5, unbiased std sqrt((0.25 + 0.25 + 0) / 2) = 0.5.
    d = 0.5 / (0.5 + 1e-6)
    np.testing.assert_allclose(out, [d, -d, 0.0], rtol=RTOL, atol=ATOL)


def test_grpo_dr_grpo_hand():
    out = _grpo(jnp.array([1.0, 0.0, 0.5]), jnp.array([7, 7, 7]), normalize_std=False)
    np.testing.assert_allclose(out, [0.5, -0.5, 0.0], rtol=RTOL, atol=ATOL)


def test_grpo_singleton_and_constant_groups_are_zero():
    scores = jnp.array([0.9, 0.3, 0.3, 0.3])
    out = _grpo(scores, jnp.array([5, 2, 2, 2]))
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.0, 0.0])
    out = _grpo(scores, jnp.array([5, 2, 2, 2]), normalize_std=False)
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_matches_reference_uneven_groups(normalize_std):
    rng = np.random.default_rng(3)
    # Arbitrary, unsorted, non-dense ids; group sizes 4, 1, 3, 2, 5.
    sizes = {1007: 4, -3: 1, 42: 3, 0: 2, 999999: 5}
    group_ids = np.concatenate([np.full(n, g) for g, n in sizes.items()])
    rng.shuffle(group_ids)
    scores = rng.uniform(size=group_ids.shape).astype(np.float32)
    fn = _grpo
    out = fn(scores, group_ids, normalize_std=normalize_std)
    ref = ref_grpo(scores, group_ids, 1e-6, normalize_std)
    np.testing.assert_allclose(out, ref, rtol=RTOL, atol=1e-5)
    # An explicit (tight) bound on the number of groups gives the same result.
    out_bound = fn(scores, group_ids, normalize_std=normalize_std, num_groups=len(sizes))
    np.testing.assert_allclose(out_bound, ref, rtol=RTOL, atol=1e-5)


def test_rloo_hand():
    out = jax.jit(adv_lib.rloo)(jnp.array([1.0, 0.0, 0.5, 0.2]), jnp.array([3, 3, 3, 8]))
    # 1 - (0 + 0.5) / 2, 0 - (1 + 0.5) / 2, 0.5 - (1 + 0) / 2; singleton -> 0.
    np.testing.assert_allclose(out, [0.75, -0.75, 0.0, 0.0], rtol=RTOL, atol=ATOL)


def test_rloo_matches_reference():
    rng = np.random.default_rng(4)
    group_ids = rng.integers(0, 6, size=17) * 11 - 20
    scores = rng.normal(size=17).astype(np.float32)
    out = jax.jit(adv_lib.rloo)(scores, group_ids)
    np.testing.assert_allclose(out, ref_rloo(scores, group_ids), rtol=RTOL, atol=1e-5)


def test_broadcast_sequence_advantage():
    mask = np.array([[1, 1, 0, 1], [0, 0, 1, 1]], np.float32)
    out = adv_lib.broadcast_sequence_advantage(jnp.array([2.0, -0.5]), mask)
    np.testing.assert_array_equal(out, [[2.0, 2.0, 0.0, 2.0], [0.0, 0.0, -0.5, -0.5]])


# ------------------------------------------------------------------------------- compute


def outcome_batch():
    """Think mode: a dialogue has one row per policy turn. Dialogues d0..d3 (rows 3, 1, 2,
    1) in groups (d0, d1), (d2, d3); one padding row at the end."""
    rewards = {0: 0.2, 1: 0.6, 2: 0.5, 3: 0.5}
    turns = {0: 3, 1: 1, 2: 2, 3: 1}
    dialogue_ids = [d for d in rewards for _ in range(turns[d])] + [-1]
    scores = [rewards.get(d, 0.0) for d in dialogue_ids]
    group_ids = [d // 2 if d >= 0 else 0 for d in dialogue_ids]
    mask = np.ones((len(dialogue_ids), 4), np.int32)
    mask[-1] = 0
    return dict(scores=jnp.array(scores), group_ids=jnp.array(group_ids),
                dialogue_ids=jnp.array(dialogue_ids), loss_mask=jnp.asarray(mask),
                rewards=jnp.zeros(mask.shape))


@pytest.mark.parametrize("jit", [False, True])
def test_compute_grpo_counts_each_dialogue_once(jit):
    compute = lambda **kw: adv_lib.compute("grpo", **kw)
    adv, returns = (jax.jit(compute) if jit else compute)(**outcome_batch())
    # (0.2 - 0.4) / (unbiased std 0.2 * sqrt(2) + 1e-6) = -0.70711; equal rewards give 0.
    # Counting rows instead of dialogues would weigh d0 three times.
    a = 0.2 / (0.2 * np.sqrt(2) + 1e-6)
    np.testing.assert_allclose(adv[:, 0], [-a, -a, -a, a, 0, 0, 0, 0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(adv, np.asarray(adv[:, :1]) * outcome_batch()["loss_mask"])
    assert not np.asarray(returns).any()


def test_compute_dispatches_on_the_algorithm():
    batch = outcome_batch()
    rows = np.asarray(batch["dialogue_ids"]) >= 0
    for algorithm, estimator in (("grpo", adv_lib.grpo), ("rloo", adv_lib.rloo)):
        # One row per dialogue: the per-dialogue advantage is the estimator's.
        first = np.array([0, 3, 4, 6])
        want = estimator(batch["scores"][first], batch["group_ids"][first])
        got, _ = adv_lib.compute(algorithm, **batch)
        np.testing.assert_allclose(got[first, 0], want, rtol=RTOL, atol=ATOL)
        assert not np.asarray(got)[~rows].any()
    dr, _ = adv_lib.compute("grpo", normalize_std=False, **batch)
    np.testing.assert_allclose(dr[:4, 0], [-0.2] * 3 + [0.2], rtol=RTOL, atol=ATOL)

    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    mask = multiturn_mask(rng, 2, 6)
    adv, returns = adv_lib.compute("ppo", rewards=rewards, values=values, loss_mask=mask,
                                   gamma=0.9, lam=0.8)
    want_adv, want_ret = adv_lib.gae(rewards, values, mask, 0.9, 0.8)
    np.testing.assert_allclose(adv, want_adv, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(returns, want_ret, rtol=RTOL, atol=ATOL)
    whitened, _ = adv_lib.compute("ppo", rewards=rewards, values=values, loss_mask=mask,
                                  gamma=0.9, lam=0.8, whiten=True)
    np.testing.assert_allclose(whitened, adv_lib.masked_whiten(want_adv, mask), rtol=RTOL,
                               atol=ATOL)
    with pytest.raises(ValueError, match="algorithm='a2c'"):
        adv_lib.compute("a2c", rewards=rewards, loss_mask=mask)
