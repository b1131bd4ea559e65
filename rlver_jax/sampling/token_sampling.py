"""One sampling step over next-token logits: temperature, top-k / top-p filtering, the
draw, and the log-probs the trainer compares against (used inside the decode loop)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


# Bisection steps that pin a float32 threshold exactly: one per bit of its ordered key.
_THRESHOLD_BISECTION_STEPS = 32


def _ordered_key(x: jax.Array) -> jax.Array:
    """int32 keys that order like the float32 values (negative floats' bits reversed)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, jnp.int32(-2**31) - bits, bits)


def _from_ordered_key(key: jax.Array) -> jax.Array:
    bits = jnp.where(key < 0, jnp.int32(-2**31) - key, key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _smallest_kept_value(values: jax.Array, keeps) -> jax.Array:
    """Per row of values [B, V], the smallest t (a value of that row) with keeps(t [B, 1]),
    for a predicate that holds at the row's maximum and, once true, for every larger t:
    a bisection over the values' ordered keys (an exact result in 32 steps of [B, V]
    compares and sums; XLA:CPU's [B, V] sort costs several decode steps of a small model)."""
    # Just below -inf: every key bisected lies in (lo, hi], all of them floats, no NaN.
    lo = jnp.full(values.shape[:-1] + (1,), _ordered_key(jnp.float32(-jnp.inf)) - 1)
    hi = _ordered_key(jnp.max(values, axis=-1, keepdims=True))   # keeps holds here

    def step(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)              # no int32 overflow
        # mid == lo once hi = lo + 1: the search is over, and lo is no float to try.
        ok = keeps(_from_ordered_key(mid)) & (mid != lo)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, _THRESHOLD_BISECTION_STEPS, step, (lo, hi))
    # hi: the smallest key whose predicate holds; the predicate only changes at values, so
    # it is the key of a value of the row.
    return _from_ordered_key(hi)


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """Sampling log-probs [B, V]: temperature, then top-k, then top-p on the renormalised
    top-k distribution (the order transformers uses). Removed tokens get -inf; tokens tied
    with the last kept one are kept (transformers compares with the k-th value too).

    top_k <= 0 and top_p >= 1 disable the filters. Temperature must be > 0 here.

    Without a sort: a token of value v is kept when fewer than k tokens are above it and the
    probability mass above it is below top_p (its place in the descending order), so the
    kept set is everything at or above the smallest such v, found by bisection.
    """
    vocab = logits.shape[-1]
    scaled = logits / temperature
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    # A disabled filter's bisection would return the row's minimum (top-k) or -inf
    # (top-p); the conds skip its 32 passes, which a decode step pays for every token.
    k_threshold = jax.lax.cond(
        k < vocab,
        lambda: _smallest_kept_value(
            scaled, lambda t: jnp.sum(scaled > t, axis=-1, keepdims=True) < k),
        lambda: jnp.min(scaled, axis=-1, keepdims=True))
    in_top_k = scaled >= k_threshold
    probs = jax.nn.softmax(jnp.where(in_top_k, scaled, -jnp.inf), axis=-1)
    mass_above = lambda t: jnp.sum(jnp.where(scaled > t, probs, 0.0), axis=-1, keepdims=True)
    # top_p >= 1 must keep everything: float32 sums reach 1.0 before the last tokens.
    p_threshold = jax.lax.cond(
        top_p < 1.0,
        lambda: _smallest_kept_value(jnp.where(in_top_k, scaled, -jnp.inf),
                                     lambda t: mass_above(t) < top_p),
        lambda: jnp.full_like(k_threshold, -jnp.inf))
    threshold = jnp.maximum(k_threshold, p_threshold)
    return jax.nn.log_softmax(jnp.where(scaled >= threshold, scaled, -jnp.inf), axis=-1)


def draw(keys: jax.Array, log_probs: jax.Array) -> jax.Array:
    """One token per row of log_probs [B, V] (keys [B]) by inverse CDF: one uniform per row
    against the running sum of the probabilities. `jax.random.categorical` draws B * V
    Gumbel numbers instead: on CPU 5x the cost (19 vs 3.7 ms a decode step at [8, 152064]).
    The float32 running sum is off by at most ~2e-7 at V = 152k, the most any token's
    chance moves; tokens of probability 0 (filtered out) are never drawn."""
    u = jax.vmap(lambda key: jax.random.uniform(key, ()))(keys)
    probs = jnp.exp(log_probs - jnp.max(log_probs, axis=-1, keepdims=True))
    # A removed token may not be drawn even where rounding lifts its running sum.
    cdf = jnp.where(probs > 0, jnp.cumsum(probs, axis=-1), -1.0)
    # 1 - u lies in (0, 1]: the first kept token whose running sum reaches the target.
    target = (1.0 - u)[:, None] * jnp.max(cdf, axis=-1, keepdims=True)
    return jnp.argmax(cdf >= target, axis=-1).astype(jnp.int32)


def sample_step(logits: jax.Array, keys: jax.Array, temperature, top_k, top_p):
    """One token per row. logits [B, V] f32, keys [B] -> (token, sampling lp, raw lp);
    raw: log-softmax of logits / temperature without top-k / top-p (temperature 1 if greedy).

    The sampling parameters are traced scalars, so the branches are `lax.cond`s rather than
    `jnp.where`s: on CPU `filter_logits` (two 32-step bisections over [B, V]) and the
    draw (`draw`: a [B, V] exp and running sum) cost a good part of a small model's decode
    step, so greedy skips both and untruncated sampling skips the filter.
    """
    raw = jax.nn.log_softmax(logits / jnp.where(temperature > 0, temperature, 1.0), axis=-1)
    take = lambda lp, token: jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0]

    def greedy(_):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return token, jnp.zeros(token.shape, jnp.float32)

    def sample(_):
        truncate = (top_k > 0) | (top_p < 1.0)
        filtered = jax.lax.cond(
            truncate, lambda: filter_logits(logits, temperature, top_k, top_p),
            lambda: jax.nn.log_softmax(logits / temperature, axis=-1))
        token = draw(keys, filtered)
        return token, take(filtered, token)

    token, sampling_lp = jax.lax.cond(temperature <= 0, greedy, sample, None)
    return token, sampling_lp, take(raw, token)


@functools.partial(jax.jit, static_argnums=1)
def row_keys(base: jax.Array, rows: int) -> jax.Array:
    """[rows] PRNG keys, row i's fold_in(base, i): one per global row, the same on every
    process (jitted: eagerly, the vmap costs milliseconds per sampler call)."""
    return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(rows))
