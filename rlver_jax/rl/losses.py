"""PPO / GRPO policy and value losses, truncated importance weights, KL estimators and the
critic's explained variance. Pure JAX. (Log-probs and entropies of the LM head: logprobs.py.)

Shapes: B = sequences, T = tokens.

Exact gradient accumulation
---------------------------
Every loss returns a `LossTerm(total, normaliser)` instead of a mean. For a batch split along
B into micro-batches k = 1..K, the full-batch loss is

    L = sum_k total_k / sum_k normaliser_k

and, because `normaliser` depends only on the mask (never on parameters),

    dL/dθ = sum_k d(total_k)/dθ / sum_k normaliser_k.

So: accumulate `grad(total_k)` and `normaliser_k`, divide once at the end; or, since masks are
known before any forward pass, compute the global normaliser first (`aggregate_normaliser`)
and differentiate `total_k / global_normaliser` in each micro-batch, which also lets several
terms with different normalisers (policy, value, entropy) be summed before the backward pass.

How each `aggregate` mode splits (micro-batches split along B, whole sequences each):

| mode                      | total                               | normaliser           |
|---------------------------|-------------------------------------|----------------------|
| `token-mean`              | sum of x over valid tokens          | number of valid tokens |
| `seq-mean-token-mean`     | sum over seqs of (mean of x in seq) | number of non-empty seqs |
| `seq-mean-token-sum`      | sum over seqs of (sum of x in seq)  | number of non-empty seqs |
| `seq-mean-token-sum-norm` | sum over seqs of (sum of x in seq) / C | number of non-empty seqs |

A sequence with no valid token (padding row) contributes nothing and is not counted. The
seq-mean modes are exact only when no sequence is split across micro-batches (split along B,
not T). `seq-mean-token-sum-norm` is Dr.GRPO: C is a constant (e.g. the maximum response
length), default T; under micro-batching every micro-batch must use the same C, so pass it
explicitly when micro-batches are padded to different lengths. Unlike verl's variant of this
mode (which does not divide by the number of sequences), the value here is a mean over
sequences, as in the Dr.GRPO paper; the two differ by a constant factor (the batch size).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_KINDS: tuple[str, ...] = ("k1", "k2", "k3", "abs", "low_var_kl")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossTerm:
    """A loss (or metric) as an exact `(total, normaliser)` pair; value = total / normaliser.

    `a + b` adds totals and normalisers: the accumulation of two micro-batches of the same
    term (not the sum of two different losses). A pytree, so it passes through jit/scan.
    """

    total: Array
    normaliser: Array

    def __add__(self, other: "LossTerm") -> "LossTerm":
        return LossTerm(self.total + other.total, self.normaliser + other.normaliser)

    def value(self) -> Array:
        """total / normaliser, and 0 when the normaliser is 0 (nothing valid)."""
        n = self.normaliser
        return jnp.where(n > 0, self.total / jnp.where(n > 0, n, 1.0), 0.0)


def _as_float_mask(mask: Array) -> Array:
    return jnp.asarray(mask).astype(jnp.float32)


def aggregate_normaliser(mask: Array, mode: AggMode = "token-mean") -> Array:
    """The normaliser `aggregate` would return: a function of the mask alone.

    Args:
      mask: [B, T] {0, 1}.
      mode: one of `AGG_MODES`.

    Returns:
      float32 scalar.
    """
    m = _as_float_mask(mask)
    if mode == "token-mean":
        return jnp.sum(m)
    if mode in AGG_MODES:
        return jnp.sum((jnp.sum(m, axis=-1) > 0).astype(jnp.float32))
    raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {AGG_MODES}")


def aggregate(
    values: Array,
    mask: Array,
    mode: AggMode = "token-mean",
    constant_normaliser: float | None = None,
) -> LossTerm:
    """Reduces per-token values to a `LossTerm` (see the module docstring for the modes).

    Args:
      values: [B, T] float, per-token loss.
      mask: [B, T] {0, 1}.
      mode: one of `AGG_MODES`.
      constant_normaliser: C for `seq-mean-token-sum-norm` (default T); ignored otherwise.

    Returns:
      LossTerm with float32 scalar fields.
    """
    values = jnp.asarray(values, jnp.float32)
    m = _as_float_mask(mask)
    # where(), not multiply: a NaN/inf at a masked position must not leak into the sum.
    masked = jnp.where(m > 0, values, 0.0)
    normaliser = aggregate_normaliser(m, mode)
    if mode == "token-mean":
        return LossTerm(jnp.sum(masked), normaliser)
    seq_sum = jnp.sum(masked, axis=-1)  # [B]
    if mode == "seq-mean-token-mean":
        seq_count = jnp.sum(m, axis=-1)
        return LossTerm(jnp.sum(seq_sum / jnp.maximum(seq_count, 1.0)), normaliser)
    if mode == "seq-mean-token-sum":
        return LossTerm(jnp.sum(seq_sum), normaliser)
    # seq-mean-token-sum-norm (aggregate_normaliser has validated `mode`).
    c = values.shape[-1] if constant_normaliser is None else constant_normaliser
    return LossTerm(jnp.sum(seq_sum) / c, normaliser)


def policy_loss(
    logp: Array,
    old_logp: Array,
    advantages: Array,
    mask: Array,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    log_ratio_clamp: float = 20.0,
    agg_mode: AggMode = "token-mean",
    constant_normaliser: float | None = None,
    token_weights: Array | None = None,
) -> tuple[LossTerm, dict[str, LossTerm]]:
    """PPO clipped surrogate with clip-higher and optional dual clip.

        ratio = exp(clamp(logp - old_logp, ±log_ratio_clamp))
        l     = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
        l     = min(l, -A * dual_clip)            for A < 0 when dual_clip is set
        l     = w * l                             with token_weights w (e.g. `tis_weights`)

    A token whose ratio is clipped (the clipped branch is the max) has zero gradient; with
    dual clip, a token with A < 0 and ratio > dual_clip has zero gradient too. The log-ratio
    clamp only guards exp() against overflow (its gradient is 0 beyond the clamp).

    Args:
      logp: [B, T] float, log-probs of the sampled tokens under the current policy.
      old_logp: [B, T] float, under the behaviour policy (no gradient flows into it).
      advantages: [B, T] float.
      mask: [B, T] {0, 1}, 1 on policy tokens.
      clip_low, clip_high: ratio range [1 - clip_low, 1 + clip_high] (DAPO clip-higher).
      dual_clip: c > 1 bounds the loss of negative-advantage tokens at -A * c; None: off.
      log_ratio_clamp: |log ratio| bound before exp.
      agg_mode, constant_normaliser: see `aggregate`.
      token_weights: [B, T] float, constant per-token factors of the loss (no gradient
        flows into them); None: 1.

    Returns:
      (loss, metrics). loss is a LossTerm; metrics are token-mean LossTerms:
      `clip_frac` (clipped branch active), `dual_clip_frac`, `approx_kl` (k3 estimate of
      KL(old || new) = ratio - 1 - log ratio), `ratio_mean`.
    """
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    logp = jnp.asarray(logp, jnp.float32)
    old_logp = jax.lax.stop_gradient(jnp.asarray(old_logp, jnp.float32))
    adv = jax.lax.stop_gradient(jnp.asarray(advantages, jnp.float32))

    log_ratio = jnp.clip(logp - old_logp, -log_ratio_clamp, log_ratio_clamp)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = jnp.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    if dual_clip is not None:
        bound = -adv * dual_clip
        dual_active = (adv < 0) & (bound < per_token)
        per_token = jnp.where(dual_active, bound, per_token)
    else:
        dual_active = jnp.zeros_like(clip_active)
    if token_weights is not None:
        per_token = per_token * jax.lax.stop_gradient(jnp.asarray(token_weights, jnp.float32))

    loss = aggregate(per_token, mask, agg_mode, constant_normaliser)
    k3_old_new = jax.lax.stop_gradient(ratio - 1.0 - log_ratio)
    metrics = {
        "clip_frac": aggregate(clip_active.astype(jnp.float32), mask),
        "dual_clip_frac": aggregate(dual_active.astype(jnp.float32), mask),
        "approx_kl": aggregate(k3_old_new, mask),
        "ratio_mean": aggregate(jax.lax.stop_gradient(ratio), mask),
    }
    return loss, metrics


def tis_weights(
    trainer_logp: Array,
    sampler_logp: Array,
    mask: Array,
    cap: float,
    log_ratio_clamp: float = 20.0,
) -> tuple[Array, dict[str, LossTerm]]:
    """Truncated importance-sampling weights for a sampler that is not the trainer's policy.

        w = min(exp(clamp(trainer_logp - sampler_logp, ±log_ratio_clamp)), cap)

    (verl / slime / NeMo-RL's TIS): tokens were drawn from the sampler's distribution, the
    trainer's objective is under its own `trainer_logp` (the old policy it recomputes), so
    each token's policy-gradient term is reweighted by their ratio, capped to bound the
    variance. The weight is a constant (no gradient). `cap <= 0` turns the cap (and, for
    callers, the correction) off: w is the plain ratio, reported but not meant to be used.

    Args:
      trainer_logp: [B, T] float, the trainer's log-probs of the sampled tokens.
      sampler_logp: [B, T] float, the sampler's (untruncated) log-probs of the same tokens.
      mask: [B, T] {0, 1}, 1 on policy tokens.
      cap: the truncation bound (e.g. 2.0); <= 0: none.
      log_ratio_clamp: |log ratio| bound before exp (overflow guard only).

    Returns:
      (weights [B, T] float32, metrics): token-mean LossTerms `weight_mean` (of the capped
      weight) and `capped_frac` (tokens whose ratio exceeded the cap).
    """
    log_ratio = jnp.clip(jnp.asarray(trainer_logp, jnp.float32)
                         - jnp.asarray(sampler_logp, jnp.float32),
                         -log_ratio_clamp, log_ratio_clamp)
    ratio = jax.lax.stop_gradient(jnp.exp(log_ratio))
    if cap > 0:
        capped = ratio > cap
        weights = jnp.minimum(ratio, cap)
    else:
        capped = jnp.zeros(ratio.shape, bool)
        weights = ratio
    metrics = {"weight_mean": aggregate(weights, mask),
               "capped_frac": aggregate(capped.astype(jnp.float32), mask)}
    return weights, metrics


def value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    clip: float | None = 0.5,
    agg_mode: AggMode = "token-mean",
    constant_normaliser: float | None = None,
) -> tuple[LossTerm, dict[str, LossTerm]]:
    """PPO clipped value loss: `0.5 * max((V - R)^2, (V_clip - R)^2)`.

    `V_clip = old_V + clip(V - old_V, ±clip)`; `clip=None` gives `0.5 * (V - R)^2`.

    Args:
      values: [B, T] float, current critic values.
      old_values: [B, T] float, values at rollout time (no gradient).
      returns: [B, T] float, targets (no gradient).
      mask: [B, T] {0, 1}.
      clip: value clip range, or None.
      agg_mode, constant_normaliser: see `aggregate`.

    Returns:
      (loss, metrics) with token-mean metrics `clip_frac` (clipped branch strictly larger)
      and `values_mean`.
    """
    values = jnp.asarray(values, jnp.float32)
    old_values = jax.lax.stop_gradient(jnp.asarray(old_values, jnp.float32))
    returns = jax.lax.stop_gradient(jnp.asarray(returns, jnp.float32))

    unclipped = jnp.square(values - returns)
    if clip is None:
        per_token = 0.5 * unclipped
        clip_active = jnp.zeros(values.shape, bool)
    else:
        v_clipped = old_values + jnp.clip(values - old_values, -clip, clip)
        clipped = jnp.square(v_clipped - returns)
        per_token = 0.5 * jnp.maximum(unclipped, clipped)
        clip_active = clipped > unclipped
    loss = aggregate(per_token, mask, agg_mode, constant_normaliser)
    metrics = {
        "clip_frac": aggregate(clip_active.astype(jnp.float32), mask),
        "values_mean": aggregate(jax.lax.stop_gradient(values), mask),
    }
    return loss, metrics


def kl_penalty(
    logp: Array,
    ref_logp: Array,
    kind: str = "k3",
    log_ratio_clamp: float = 20.0,
    k3_max: float | None = 10.0,
) -> Array:
    """Per-token estimators of KL(policy || ref) from samples of the policy.

    With d = logp - ref_logp:
      - `k1`: d (unbiased, high variance, can be negative);
      - `k2`: 0.5 * d^2;
      - `k3` (alias `low_var_kl`): exp(-d) + d - 1 (unbiased, >= 0, low variance);
      - `abs`: |d|.

    Stability: for `k3` the exponent is clamped to ±log_ratio_clamp before exp (no
    overflow; gradient 0 beyond) and the result to at most `k3_max` (as verl does, 10 by
    default; None disables). k1, k2 and abs are polynomial in d and need no clamp.

    Args:
      logp: [B, T] float (current policy).
      ref_logp: [B, T] float (reference policy, no gradient).
      kind: one of `KL_KINDS`.
      log_ratio_clamp: bound on |ref_logp - logp| inside exp for k3.
      k3_max: upper bound on the k3 value, or None.

    Returns:
      [B, T] float32 (mask it with `aggregate`).
    """
    logp = jnp.asarray(logp, jnp.float32)
    ref_logp = jax.lax.stop_gradient(jnp.asarray(ref_logp, jnp.float32))
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * jnp.square(d)
    if kind == "abs":
        return jnp.abs(d)
    if kind in ("k3", "low_var_kl"):
        neg_d = jnp.clip(-d, -log_ratio_clamp, log_ratio_clamp)
        kl = jnp.exp(neg_d) - neg_d - 1.0
        return kl if k3_max is None else jnp.minimum(kl, k3_max)
    raise ValueError(f"unknown KL kind {kind!r}; expected one of {KL_KINDS}")


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
    """1 - Var[returns - values] / Var[returns] over valid tokens (critic quality metric).

    1 is a perfect critic, 0 no better than a constant, negative worse. Returns 0 when the
    returns have no variance (the ratio is undefined), so the metric stays JSON-friendly.

    Args:
      values: [B, T] float.
      returns: [B, T] float.
      mask: [B, T] {0, 1}.

    Returns:
      float32 scalar.
    """
    values = jnp.asarray(values, jnp.float32)
    returns = jnp.asarray(returns, jnp.float32)
    m = _as_float_mask(mask)
    n = jnp.maximum(jnp.sum(m), 1.0)

    def var(x):
        x = jnp.where(m > 0, x, 0.0)
        mean = jnp.sum(x) / n
        return jnp.sum(jnp.where(m > 0, jnp.square(x - mean), 0.0)) / n

    var_returns = var(returns)
    ratio = var(returns - values) / jnp.where(var_returns > 0, var_returns, 1.0)
    return jnp.where(var_returns > 0, 1.0 - ratio, 0.0)
