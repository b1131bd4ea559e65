"""Advantage estimators: GAE for PPO, group baselines (GRPO, Dr.GRPO, RLOO) for critic-free RL.

Pure functions of arrays; every one jits. Shapes: B = batch (sequences), T = tokens.
`compute` is what the training step calls: it picks the estimator of `rl.algorithm`.

Multi-turn convention (see DESIGN.md): a dialogue is one sequence whose `mask` is 1 only on
policy-generated tokens. User turns are gaps of zeros between policy turns; the outcome reward
sits on the last policy token. `gae` treats the gaps as if the tokens were not there at all.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def gae(
    rewards: Array,
    values: Array,
    mask: Array,
    gamma: float | Array,
    lam: float | Array,
) -> tuple[Array, Array]:
    """Generalised advantage estimation over the valid tokens of each sequence.

    Positions with `mask == 0` are skipped as if absent: the "next value" and the running
    advantage are carried across them unchanged and no discount is spent on them, so a
    dialogue with user turns in between gives exactly the GAE of its policy tokens laid end
    to end. Rewards and values at masked positions are ignored (place rewards on a valid
    token). The value after the last valid token is 0 (terminal).

        delta_t = r_t + gamma * V_next(t) - V_t
        A_t     = delta_t + gamma * lam * A_next(t)
        R_t     = A_t + V_t

    where next(t) is the next valid position after t. No whitening (see `masked_whiten`).

    Args:
      rewards: [B, T] float.
      values: [B, T] float, critic values V_t.
      mask: [B, T] {0, 1} (bool or numeric).
      gamma: discount.
      lam: GAE lambda.

    Returns:
      (advantages, returns), each [B, T] float32, 0 where `mask == 0`.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    valid = jnp.asarray(mask).astype(bool)

    def step(carry, xs):
        next_value, next_adv = carry  # [B], [B]: from the next *valid* position.
        r, v, m = xs  # [B] each
        delta = r + gamma * next_value - v
        adv = delta + gamma * lam * next_adv
        # Masked positions leave the carry untouched: that is what makes gaps transparent.
        carry = (jnp.where(m, v, next_value), jnp.where(m, adv, next_adv))
        return carry, jnp.where(m, adv, 0.0)

    batch = rewards.shape[0]
    init = (jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.float32))
    xs = (rewards.T, values.T, valid.T)  # time-major [T, B] for the scan
    _, adv_tb = jax.lax.scan(step, init, xs, reverse=True)
    advantages = adv_tb.T
    returns = jnp.where(valid, advantages + values, 0.0)
    return advantages, returns


def masked_mean(x: Array, mask: Array, axis: int | tuple[int, ...] | None = None) -> Array:
    """Mean of `x` over positions where `mask` is 1; 0 when there are none.

    Args:
      x: [...] float.
      mask: same shape as `x`.
      axis: reduction axes (None: all).
    """
    m = jnp.asarray(mask).astype(jnp.float32)
    total = jnp.sum(jnp.where(m > 0, x, 0.0), axis=axis)
    count = jnp.sum(m, axis=axis)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def masked_whiten(
    x: Array,
    mask: Array,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> Array:
    """Whitens `x` with the mean and unbiased variance of its valid positions.

    `(x - mean) / sqrt(var + eps)`; with `shift_mean=False` the mean is added back (scale
    only, as PPO implementations do for advantages whose sign carries meaning). The variance
    uses Bessel's correction (n - 1), matching TRL / verl. Masked positions come out as 0.

    Args:
      x: [B, T] (any shape) float.
      mask: same shape, {0, 1}.
      shift_mean: subtract the mean (True) or only rescale (False).
      eps: added to the variance.

    Returns:
      Array shaped like `x`, float32.
    """
    x = jnp.asarray(x, jnp.float32)
    m = jnp.asarray(mask).astype(jnp.float32)
    n = jnp.sum(m)
    mean = masked_mean(x, m)
    sq_dev = jnp.sum(jnp.square(x - mean) * m)
    var = sq_dev / jnp.maximum(n - 1.0, 1.0)
    out = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def _dense_group_index(group_ids: Array, num_groups: int | None) -> tuple[Array, int]:
    """Maps arbitrary integer ids [B] to dense indices in [0, num_groups).

    `num_groups` must be a static upper bound on the number of distinct ids (default B,
    always enough). A smaller bound that is exceeded silently merges groups.
    """
    group_ids = jnp.asarray(group_ids).reshape(-1)
    size = group_ids.shape[0] if num_groups is None else int(num_groups)
    # `size=` keeps the output shape static so this traces under jit.
    _, inverse = jnp.unique(group_ids, size=size, return_inverse=True)
    return inverse.reshape(-1), size


def _group_stats(scores: Array, index: Array, num_groups: int) -> tuple[Array, Array, Array]:
    """Per-element group count, group sum and group sum of squared deviations, each [B]."""
    ones = jnp.ones_like(scores)
    count_g = jax.ops.segment_sum(ones, index, num_segments=num_groups)
    sum_g = jax.ops.segment_sum(scores, index, num_segments=num_groups)
    mean_g = sum_g / jnp.maximum(count_g, 1.0)
    # Two-pass variance: numerically safer than E[x^2] - E[x]^2 for near-equal rewards.
    sq_dev_g = jax.ops.segment_sum(jnp.square(scores - mean_g[index]), index, num_segments=num_groups)
    return count_g[index], sum_g[index], sq_dev_g[index]


def grpo(
    scores: Array,
    group_ids: Array,
    eps: float = 1e-6,
    normalize_std: bool = True,
    num_groups: int | None = None,
) -> Array:
    """GRPO group-normalised advantages: `(r - mean_g) / (std_g + eps)`.

    std_g is the unbiased (ddof=1) standard deviation of the group, as in the RLVER / verl
    reference. A group of size 1 has no baseline and gets advantage 0. A group whose rewards
    are all equal gets 0. With `normalize_std=False` this is Dr.GRPO: `r - mean_g`.

    Args:
      scores: [B] float, one scalar reward per sample.
      group_ids: [B] int, arbitrary ids (need not be dense or sorted; groups may differ in
        size). Samples with equal id form a group (e.g. rollouts of one profile).
      eps: added to the std.
      normalize_std: divide by std (GRPO) or not (Dr.GRPO).
      num_groups: static upper bound on the number of distinct ids; default B.

    Returns:
      [B] float32 advantages.
    """
    scores = jnp.asarray(scores, jnp.float32).reshape(-1)
    index, size = _dense_group_index(group_ids, num_groups)
    count, total, sq_dev = _group_stats(scores, index, size)
    centred = scores - total / count
    if normalize_std:
        std = jnp.sqrt(sq_dev / jnp.maximum(count - 1.0, 1.0))
        centred = centred / (std + eps)
    return jnp.where(count > 1, centred, 0.0)


def rloo(scores: Array, group_ids: Array, num_groups: int | None = None) -> Array:
    """REINFORCE leave-one-out advantages: `r_i - mean_{j in g, j != i} r_j`.

    Equals `n / (n - 1) * (r_i - mean_g)`. A group of size 1 gets advantage 0.

    Args:
      scores: [B] float.
      group_ids: [B] int, arbitrary ids (see `grpo`).
      num_groups: static upper bound on the number of distinct ids; default B.

    Returns:
      [B] float32 advantages.
    """
    scores = jnp.asarray(scores, jnp.float32).reshape(-1)
    index, size = _dense_group_index(group_ids, num_groups)
    count, total, _ = _group_stats(scores, index, size)
    baseline = (total - scores) / jnp.maximum(count - 1.0, 1.0)
    return jnp.where(count > 1, scores - baseline, 0.0)


def broadcast_sequence_advantage(advantages: Array, mask: Array) -> Array:
    """Spreads one advantage per sequence over its valid tokens (outcome rewards).

    Args:
      advantages: [B] float.
      mask: [B, T] {0, 1}.

    Returns:
      [B, T] float32: `advantages[b]` where `mask[b, t]`, else 0.
    """
    m = jnp.asarray(mask).astype(jnp.float32)
    return jnp.asarray(advantages, jnp.float32)[:, None] * m


# rl.algorithm -> whether it trains a critic (GAE) or uses a group baseline of outcome rewards.
ALGORITHMS = ("ppo", "grpo", "rloo")
CRITIC_ALGORITHMS = ("ppo",)


def per_dialogue(estimator, scores: Array, group_ids: Array, dialogue_ids: Array) -> Array:
    """Runs a group estimator over dialogues, not rows, and hands each row its dialogue's
    advantage [B].

    In think mode a dialogue has one row per turn (all with the dialogue's score and group)
    and must count once in its group's statistics. `dialogue_ids` [B] are dense indices
    in [0, B), -1 on padding rows (which get 0).
    """
    n = dialogue_ids.shape[0]
    valid = dialogue_ids >= 0
    # Slot n collects the padding rows; slots no dialogue uses join it in group -1, a group
    # of its own that no row reads back.
    slot = jnp.where(valid, dialogue_ids, n)
    d_scores = jnp.zeros((n + 1,), jnp.float32).at[slot].set(scores.astype(jnp.float32))
    d_groups = jnp.full((n + 1,), -1, jnp.int32).at[slot].set(
        jnp.where(valid, group_ids, -1).astype(jnp.int32))
    return jnp.where(valid, estimator(d_scores, d_groups)[slot], 0.0)


def compute(algorithm: str, *, rewards: Array, loss_mask: Array, values: Array | None = None,
            scores: Array | None = None, group_ids: Array | None = None,
            dialogue_ids: Array | None = None, gamma: float = 1.0, lam: float = 1.0,
            normalize_std: bool = True, whiten: bool = False) -> tuple[Array, Array]:
    """The advantages [B, T] and returns [B, T] of a train batch under `algorithm`.

    ppo: `gae` of the per-token `rewards` against the critic's `values`.
    grpo: `grpo` of each dialogue's outcome `scores` within its `group_ids` (Dr.GRPO with
      `normalize_std=False`), spread over the policy tokens; returns are 0 (no critic).
    rloo: the same with the leave-one-out baseline (`rloo`).
    `whiten` whitens the advantages over `loss_mask` (returns are taken before).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}: expected one of {ALGORITHMS}")
    if algorithm in CRITIC_ALGORITHMS:
        advantages, returns = gae(rewards, values, loss_mask, gamma, lam)
    else:
        estimator = (functools.partial(grpo, normalize_std=normalize_std)
                     if algorithm == "grpo" else rloo)
        row = per_dialogue(estimator, scores, group_ids, dialogue_ids)
        advantages = broadcast_sequence_advantage(row, loss_mask)
        returns = jnp.zeros_like(advantages)
    if whiten:
        advantages = masked_whiten(advantages, loss_mask)
    return advantages, returns
