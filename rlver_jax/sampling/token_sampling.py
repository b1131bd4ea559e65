"""One sampling step over next-token logits: temperature, top-k / top-p filtering, the
draw, and the log-probs the trainer compares against (used inside the decode loop)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array) -> jax.Array:
    """Sampling log-probs [B, V]: temperature, then top-k, then top-p on the renormalised
    top-k distribution (the order transformers uses). Removed tokens get -inf.

    top_k <= 0 and top_p >= 1 disable the filters. Temperature must be > 0 here.
    """
    vocab = logits.shape[-1]
    scaled = logits / temperature
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    rank = jnp.arange(vocab)
    in_top_k = rank[None, :] < k
    sorted_probs = jax.nn.softmax(jnp.where(in_top_k, sorted_desc, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # top_p >= 1 must keep everything: the float32 cumsum reaches 1.0 before the last tokens,
    # so `mass_before < 1` alone would drop tokens of probability below ~1e-7.
    keep_sorted = in_top_k & ((mass_before < top_p) | (top_p >= 1.0) | (rank[None, :] == 0))
    # The smallest kept logit is the threshold; ties at the threshold are kept.
    threshold = jnp.min(jnp.where(keep_sorted, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jax.nn.log_softmax(jnp.where(scaled >= threshold, scaled, -jnp.inf), axis=-1)


def sample_step(logits: jax.Array, keys: jax.Array, temperature, top_k, top_p):
    """One token per row. logits [B, V] f32, keys [B] -> (token, sampling lp, raw lp);
    raw: log-softmax of logits / temperature without top-k / top-p (temperature 1 if greedy).

    The sampling parameters are traced scalars, so the branches are `lax.cond`s rather than
    `jnp.where`s: on CPU the [B, V] sort of `filter_logits` costs more than a decode step of
    a 100M model, and the categorical draw (B * V random numbers) nearly as much, so greedy
    skips both and untruncated sampling skips the sort.
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
        token = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
        return token, take(filtered, token)

    token, sampling_lp = jax.lax.cond(temperature <= 0, greedy, sample, None)
    return token, sampling_lp, take(raw, token)
