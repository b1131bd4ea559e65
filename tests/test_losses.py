"""Losses, KL estimators, entropy, chunked log-probs: references, hand cases, accumulation."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlver_jax.rl import logprobs, losses

RTOL = 1e-5
ATOL = 1e-6


def multiturn_mask(rng, batch, length):
    """Rows of policy turns separated by gaps, with the last row empty (padding)."""
    mask = np.zeros((batch, length), np.float32)
    for b in range(batch - 1):
        t = int(rng.integers(0, 3))
        while t < length:
            turn = int(rng.integers(1, 5))
            mask[b, t : t + turn] = 1
            t += turn + int(rng.integers(1, 4))
    return mask


# ----------------------------------------------------------------------------- aggregation


def ref_aggregate(x, mask, mode, c=None):
    seq_vals = []
    tokens, count = 0.0, 0
    for b in range(x.shape[0]):
        vals = [float(x[b, t]) for t in range(x.shape[1]) if mask[b, t]]
        tokens += sum(vals)
        count += len(vals)
        if not vals:
            continue
        if mode == "seq-mean-token-mean":
            seq_vals.append(sum(vals) / len(vals))
        elif mode == "seq-mean-token-sum":
            seq_vals.append(sum(vals))
        elif mode == "seq-mean-token-sum-norm":
            seq_vals.append(sum(vals) / (x.shape[1] if c is None else c))
    if mode == "token-mean":
        return tokens / count
    return sum(seq_vals) / len(seq_vals)


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_aggregate_matches_reference(mode):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 11)).astype(np.float32)
    mask = multiturn_mask(rng, 5, 11)
    term = jax.jit(losses.aggregate, static_argnames="mode")(x, mask, mode=mode)
    np.testing.assert_allclose(term.value(), ref_aggregate(x, mask, mode), rtol=RTOL, atol=ATOL)


def test_aggregate_hand():
    x = jnp.array([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert float(losses.aggregate(x, mask, "token-mean").value()) == pytest.approx(10.0 / 4)
    assert float(losses.aggregate(x, mask, "seq-mean-token-mean").value()) == pytest.approx((2.0 + 4.0) / 2)
    assert float(losses.aggregate(x, mask, "seq-mean-token-sum").value()) == pytest.approx((6.0 + 4.0) / 2)
    term = losses.aggregate(x, mask, "seq-mean-token-sum-norm", constant_normaliser=5.0)
    assert float(term.value()) == pytest.approx((6.0 / 5 + 4.0 / 5) / 2)
    # Default constant: T = 4.
    term = losses.aggregate(x, mask, "seq-mean-token-sum-norm")
    assert float(term.value()) == pytest.approx((6.0 / 4 + 4.0 / 4) / 2)


def test_aggregate_masked_nan_does_not_leak_and_empty_is_zero():
    x = jnp.array([[1.0, jnp.nan]])
    assert float(losses.aggregate(x, jnp.array([[1, 0]])).value()) == 1.0
    empty = losses.aggregate(x, jnp.zeros((1, 2)))
    assert float(empty.value()) == 0.0 and float(empty.normaliser) == 0.0


def test_unknown_mode_raises():
    with pytest.raises(ValueError):
        losses.aggregate(jnp.ones((1, 2)), jnp.ones((1, 2)), "seq-sum")


# ----------------------------------------------------------------------------- grad accumulation


def _policy_setup(seed=1, batch=6, length=9, features=3):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(batch, length, features)).astype(np.float32)
    theta = rng.normal(size=(features,)).astype(np.float32) * 0.1
    old_logp = (-1.0 + 0.3 * rng.normal(size=(batch, length))).astype(np.float32)
    advantages = rng.normal(size=(batch, length)).astype(np.float32)
    mask = multiturn_mask(rng, batch, length)
    return feats, jnp.asarray(theta), old_logp, advantages, mask


def _policy_term(theta, feats, old_logp, advantages, mask, mode):
    # logp depends on theta so the gradient is non-trivial; ratios land on both sides of
    # the clip range.
    logp = old_logp + jnp.einsum("BTF,F->BT", feats, theta)
    loss, _ = losses.policy_loss(logp, old_logp, advantages, mask, agg_mode=mode, dual_clip=3.0)
    return loss


@pytest.mark.parametrize("mode", losses.AGG_MODES)
def test_grad_accumulation_is_exact(mode):
    feats, theta, old_logp, advantages, mask = _policy_setup()
    args = (feats, old_logp, advantages, mask)
    # Uneven micro-batches along B (the last one holds the empty padding row).
    slices = [slice(0, 2), slice(2, 3), slice(3, 6)]

    def term(th, sl=slice(None)):
        return _policy_term(th, *(a[sl] for a in args), mode)

    @jax.jit  # one compile for the whole comparison keeps the test fast
    def compare(th):
        full_loss, full_grad = jax.value_and_grad(lambda t: term(t).value())(th)
        parts = [jax.value_and_grad(lambda t, sl=sl: term(t, sl).total)(th) for sl in slices]
        norms = [term(th, sl).normaliser for sl in slices]
        acc = sum((term(th, sl) for sl in slices[1:]), term(th, slices[0]))  # LossTerm.__add__
        return dict(full_loss=full_loss, full_grad=full_grad,
                    acc_total=sum(p[0] for p in parts), acc_grad=sum(p[1] for p in parts),
                    acc_norm=sum(norms), acc_value=acc.value(),
                    global_norm=losses.aggregate_normaliser(mask, mode))

    r = compare(theta)
    # Accumulate grad(total_k) and normaliser_k over micro-batches, divide once.
    np.testing.assert_allclose(r["acc_total"] / r["acc_norm"], r["full_loss"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(r["acc_grad"] / r["acc_norm"], r["full_grad"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(r["acc_value"], r["full_loss"], rtol=RTOL, atol=ATOL)
    # The normaliser is a function of the masks alone, so it can be computed before any
    # forward pass and each micro-batch can differentiate total_k / global_normaliser.
    np.testing.assert_allclose(r["global_norm"], r["acc_norm"])
    assert float(jnp.max(jnp.abs(r["full_grad"]))) > 1e-3  # the check is not vacuous
    # And against the plain-Python reference of the aggregation.
    logp = old_logp + np.einsum("BTF,F->BT", feats, np.asarray(theta))
    per_token = ref_per_token_policy_loss(logp, old_logp, advantages, dual=3.0)
    np.testing.assert_allclose(r["full_loss"], ref_aggregate(per_token, mask, mode), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- policy loss


def ref_per_token_policy_loss(logp, old_logp, adv, dual, lo=0.2, hi=0.2):
    out = np.zeros(logp.shape)
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            r = math.exp(float(logp[b, t]) - float(old_logp[b, t]))
            a = float(adv[b, t])
            loss = max(-a * r, -a * min(max(r, 1 - lo), 1 + hi))
            out[b, t] = min(loss, -a * dual) if a < 0 else loss
    return out


def ref_policy_loss(logp, old_logp, adv, mask, lo, hi, dual, clamp):
    total, count, clipped_n, dual_n, kl, ratio_sum = 0.0, 0, 0, 0, 0.0, 0.0
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            lr = min(max(float(logp[b, t]) - float(old_logp[b, t]), -clamp), clamp)
            r = math.exp(lr)
            a = float(adv[b, t])
            l1 = -a * r
            l2 = -a * min(max(r, 1 - lo), 1 + hi)
            loss = max(l1, l2)
            clipped_n += l2 > l1
            if dual is not None and a < 0 and -a * dual < loss:
                loss = -a * dual
                dual_n += 1
            total += loss
            count += 1
            kl += r - 1 - lr
            ratio_sum += r
    return total / count, clipped_n / count, dual_n / count, kl / count, ratio_sum / count


@pytest.mark.parametrize("dual", [None, 2.0])
def test_policy_loss_matches_reference(dual):
    rng = np.random.default_rng(2)
    batch, length = 4, 13
    old_logp = (-2.0 + rng.normal(size=(batch, length))).astype(np.float32)
    logp = (old_logp + 0.8 * rng.normal(size=(batch, length))).astype(np.float32)
    logp[0, 0] = old_logp[0, 0] + 40.0  # beyond the log-ratio clamp
    adv = rng.normal(size=(batch, length)).astype(np.float32)
    mask = multiturn_mask(rng, batch, length)
    mask[0, 0] = 1
    loss, metrics = jax.jit(losses.policy_loss, static_argnames="dual_clip")(
        logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=dual
    )
    ref = ref_policy_loss(logp, old_logp, adv, mask, 0.2, 0.28, dual, 20.0)
    got = (loss.value(), metrics["clip_frac"].value(), metrics["dual_clip_frac"].value(),
           metrics["approx_kl"].value(), metrics["ratio_mean"].value())
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=RTOL, atol=ATOL)
    assert np.isfinite(float(loss.value()))


@functools.partial(jax.jit, static_argnames=("clip_high", "dual_clip"))
def _token_grad(log_ratio, advantage, clip_high=0.2, dual_clip=None):
    def f(lp):
        loss, _ = losses.policy_loss(lp, jnp.zeros((1, 1)), jnp.full((1, 1), advantage),
                                     jnp.ones((1, 1)), clip_high=clip_high, dual_clip=dual_clip)
        return loss.value()

    return jax.grad(f)(jnp.full((1, 1), log_ratio))[0, 0]


def _single_token_grad(log_ratio, advantage, **kw):
    """d loss / d logp for one token with old_logp = 0 (so logp is the log ratio)."""
    return float(_token_grad(log_ratio, advantage, **kw))


def test_policy_clip_zero_gradient_outside_range():
    up, down = math.log(1.5), math.log(0.5)
    # A > 0 and ratio above 1 + clip_high: clipped, no gradient.
    assert _single_token_grad(up, 1.0) == 0.0
    # A < 0 and ratio below 1 - clip_low: clipped, no gradient.
    assert _single_token_grad(down, -1.0) == 0.0
    # Pessimistic side is not clipped: d(-A r)/d logp = -A r.
    np.testing.assert_allclose(_single_token_grad(down, 1.0), -0.5, rtol=RTOL)
    np.testing.assert_allclose(_single_token_grad(up, -1.0), 1.5, rtol=RTOL)
    # Inside the range: gradient -A * r.
    np.testing.assert_allclose(_single_token_grad(math.log(1.1), 2.0), -2.2, rtol=RTOL)
    # Clip-higher: ratio 1.25 is inside [0.8, 1.28] but outside [0.8, 1.2].
    assert _single_token_grad(math.log(1.25), 1.0, clip_high=0.2) == 0.0
    np.testing.assert_allclose(_single_token_grad(math.log(1.25), 1.0, clip_high=0.28), -1.25, rtol=RTOL)


def test_policy_dual_clip():
    big = math.log(5.0)
    # A < 0 and ratio 5 > c = 3: loss bounded at -A c = 3, no gradient.
    assert _single_token_grad(big, -1.0, dual_clip=3.0) == 0.0
    loss, metrics = jax.jit(functools.partial(losses.policy_loss, dual_clip=3.0))(
        jnp.full((1, 1), big), jnp.zeros((1, 1)), -jnp.ones((1, 1)), jnp.ones((1, 1)))
    np.testing.assert_allclose(loss.value(), 3.0, rtol=RTOL)
    assert float(metrics["dual_clip_frac"].value()) == 1.0
    # Without dual clip the same token keeps gradient -A r = 5.
    np.testing.assert_allclose(_single_token_grad(big, -1.0), 5.0, rtol=RTOL)
    # Dual clip never touches positive advantages (ratio 5 with A > 0 is the upper clip).
    assert _single_token_grad(big, 1.0, dual_clip=3.0) == 0.0
    with pytest.raises(ValueError):
        losses.policy_loss(jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1)), jnp.ones((1, 1)),
                           dual_clip=1.0)


def test_policy_loss_hand():
    # ratio 1 everywhere: loss = -mean(A) over valid tokens, nothing clipped, KL 0.
    adv = jnp.array([[1.0, -3.0, 5.0]])
    loss, metrics = jax.jit(losses.policy_loss)(jnp.zeros((1, 3)), jnp.zeros((1, 3)), adv,
                                                jnp.array([[1, 1, 0]]))
    np.testing.assert_allclose(loss.value(), 1.0, rtol=RTOL)
    assert float(loss.normaliser) == 2.0
    assert float(metrics["clip_frac"].value()) == 0.0
    assert float(metrics["approx_kl"].value()) == 0.0
    assert float(metrics["ratio_mean"].value()) == 1.0


# ------------------------------------------------------------ truncated importance sampling


@pytest.mark.parametrize("cap", [2.0, 0.0])
def test_tis_weights_and_weighted_policy_loss_hand(cap):
    # Trainer vs sampler probabilities of four sampled tokens (the last is off the mask):
    # ratios 0.5/0.2 = 2.5, 0.3/0.3 = 1, 0.2/0.4 = 0.5, 0.4/0.1 = 4.
    trainer = jnp.log(jnp.array([[0.5, 0.3, 0.2, 0.4]]))
    sampler = jnp.log(jnp.array([[0.2, 0.3, 0.4, 0.1]]))
    mask = jnp.array([[1, 1, 1, 0]])
    weights, metrics = losses.tis_weights(trainer, sampler, mask, cap)
    want = [2.0, 1.0, 0.5, 2.0] if cap else [2.5, 1.0, 0.5, 4.0]
    np.testing.assert_allclose(weights, [want], rtol=RTOL)
    np.testing.assert_allclose(metrics["weight_mean"].value(), sum(want[:3]) / 3, rtol=RTOL)
    np.testing.assert_allclose(metrics["capped_frac"].value(), 1 / 3 if cap else 0.0)
    # A constant: no gradient reaches the trainer's log-probs through the weight.
    grad_w = jax.grad(lambda t: losses.tis_weights(t, sampler, mask, cap)[0].sum())(trainer)
    np.testing.assert_array_equal(grad_w, 0.0)

    # At ratio 1 (logp = old_logp) the token loss is -A, times the weight:
    # cap 2: (-1*2 + 2*1 - 4*0.5) / 3 = -2/3; no cap: (-2.5 + 2 - 2) / 3 = -2.5/3.
    adv = jnp.array([[1.0, -2.0, 4.0, 7.0]])
    loss_fn = lambda logp: losses.policy_loss(logp, trainer, adv, mask,
                                              token_weights=weights)[0].value()
    np.testing.assert_allclose(loss_fn(trainer), (-2.0 if cap else -2.5) / 3, rtol=RTOL)
    # d loss / d logp = -A * w * ratio / n on unclipped tokens.
    np.testing.assert_allclose(jax.grad(loss_fn)(trainer),
                               [[-want[0] / 3, 2 * want[1] / 3, -4 * want[2] / 3, 0.0]],
                               rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- value loss


def test_value_loss_matches_reference_and_hand():
    rng = np.random.default_rng(3)
    v = rng.normal(size=(3, 8)).astype(np.float32)
    old = (v + rng.normal(size=v.shape)).astype(np.float32)
    ret = rng.normal(size=v.shape).astype(np.float32)
    mask = multiturn_mask(rng, 3, 8)
    loss, metrics = jax.jit(losses.value_loss)(v, old, ret, mask, 0.5)
    total, count, n_clip = 0.0, 0, 0
    for b in range(3):
        for t in range(8):
            if mask[b, t]:
                vc = old[b, t] + min(max(v[b, t] - old[b, t], -0.5), 0.5)
                u, c = (v[b, t] - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2
                total += 0.5 * max(u, c)
                n_clip += c > u
                count += 1
    np.testing.assert_allclose(loss.value(), total / count, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(metrics["clip_frac"].value(), n_clip / count, rtol=RTOL, atol=ATOL)

    # Hand: V = 2, old V = 0, R = 0 -> V_clip = 0.5; max(4, 0.25) / 2 = 2 (unclipped wins,
    # gradient V - R = 2). V = 2, old V = 0, R = 3 -> clipped (2.5^2 > 1^2): loss 3.125,
    # zero gradient.
    def f(values, returns):
        term, m = losses.value_loss(values, jnp.zeros((1, 1)), returns, jnp.ones((1, 1)), clip=0.5)
        return term.value(), m

    f_grad = jax.jit(jax.value_and_grad(f, has_aux=True))
    (val, m), g = f_grad(jnp.full((1, 1), 2.0), jnp.zeros((1, 1)))
    np.testing.assert_allclose([val, g[0, 0]], [2.0, 2.0], rtol=RTOL)
    assert float(m["clip_frac"].value()) == 0.0
    (val, m), g = f_grad(jnp.full((1, 1), 2.0), jnp.full((1, 1), 3.0))
    np.testing.assert_allclose([val, g[0, 0]], [3.125, 0.0], rtol=RTOL)
    assert float(m["clip_frac"].value()) == 1.0
    unclipped, _ = losses.value_loss(jnp.full((1, 1), 2.0), jnp.zeros((1, 1)), jnp.full((1, 1), 3.0),
                                     jnp.ones((1, 1)), clip=None)
    np.testing.assert_allclose(unclipped.value(), 0.5, rtol=RTOL)


# ----------------------------------------------------------------------------- KL


_kl = jax.jit(losses.kl_penalty, static_argnames=("kind", "k3_max"))


def test_kl_estimators_match_formulas():
    rng = np.random.default_rng(4)
    logp = (-1.5 + rng.normal(size=(3, 7))).astype(np.float32)
    ref = (-1.5 + rng.normal(size=(3, 7))).astype(np.float32)
    d = logp.astype(np.float64) - ref
    np.testing.assert_allclose(_kl(logp, ref, "k1"), d, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(_kl(logp, ref, "k2"), 0.5 * d**2, rtol=RTOL, atol=ATOL)
    k3 = np.exp(ref - logp.astype(np.float64)) - (ref - logp) - 1
    np.testing.assert_allclose(_kl(logp, ref, "k3"), k3, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(_kl(logp, ref, "low_var_kl"), k3, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(_kl(logp, ref, "abs"), np.abs(d), rtol=RTOL, atol=ATOL)
    # Hand: d = log 2 -> k3 = 1/2 + log 2 - 1.
    k3_hand = _kl(jnp.array([[math.log(2.0)]]), jnp.zeros((1, 1)), "k3")
    np.testing.assert_allclose(k3_hand, [[0.5 + math.log(2.0) - 1.0]], rtol=RTOL)
    # k3 gradient w.r.t. logp: 1 - exp(ref - logp).
    g = jax.jit(jax.grad(lambda lp: losses.kl_penalty(lp, ref, "k3").sum()))(jnp.asarray(logp))
    np.testing.assert_allclose(g, 1 - np.exp(ref - logp.astype(np.float64)), rtol=RTOL, atol=1e-5)
    with pytest.raises(ValueError):
        losses.kl_penalty(logp, ref, "k4")


def test_k3_clamps():
    logp = jnp.array([[-60.0, 0.0]])
    ref = jnp.array([[0.0, -60.0]])
    out = _kl(logp, ref, "k3")
    assert np.all(np.isfinite(out))
    # ref >> logp: exp would be e^60; the result is capped at k3_max.
    np.testing.assert_allclose(out[0, 0], 10.0)
    # logp >> ref: exp(-60) ~ 0, k3 ~ d - 1 = 59, capped; with no cap, the clamp of the
    # exponent at -20 gives exp(-20) + 20 - 1.
    np.testing.assert_allclose(out[0, 1], 10.0)
    uncapped = _kl(logp, ref, "k3", k3_max=None)
    np.testing.assert_allclose(uncapped[0, 1], math.exp(-20.0) + 19.0, rtol=RTOL)
    assert np.isfinite(float(uncapped[0, 0]))


# ----------------------------------------------------------------------------- entropy & head


def test_entropy_from_logits():
    rng = np.random.default_rng(5)
    logits = (3.0 * rng.normal(size=(2, 3, 17))).astype(np.float32)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(jax.jit(logprobs.entropy_from_logits)(logits), ref, rtol=RTOL, atol=1e-5)
    # Uniform over V: log V.
    np.testing.assert_allclose(jax.jit(logprobs.entropy_from_logits)(jnp.zeros((5,))), math.log(5.0), rtol=RTOL)


def _direct_head(hidden, weight, targets, temperature):
    logits = jnp.einsum("BTD,DV->BTV", hidden, weight) / temperature
    logp_all = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
    return logp, logprobs.entropy_from_logits(logits)


B, T, D, V = 2, 12, 8, 37


def _head_inputs(seed=6):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(B, T, D)).astype(np.float32))
    weight = jnp.asarray((0.5 * rng.normal(size=(D, V))).astype(np.float32))
    targets = jnp.asarray(rng.integers(0, V, size=(B, T)))
    cot_lp = jnp.asarray(rng.normal(size=(B, T)).astype(np.float32))
    cot_ent = jnp.asarray(rng.normal(size=(B, T)).astype(np.float32))
    return hidden, weight, targets, cot_lp, cot_ent


def _values_and_grads(head_fn, hidden, weight, targets, temperature, cot_lp, cot_ent):
    """(logp, entropy, d/dhidden, d/dweight) of sum(logp * cot_lp) + sum(entropy * cot_ent)."""
    (lp, ent), vjp = jax.vjp(lambda h, w: head_fn(h, w, targets, temperature), hidden, weight)
    g_h, g_w = vjp((cot_lp, cot_ent))
    return lp, ent, g_h, g_w


@jax.jit
def _direct_values_and_grads(hidden, weight, targets, temperature, cot_lp, cot_ent):
    return _values_and_grads(_direct_head, hidden, weight, targets, temperature, cot_lp, cot_ent)


@pytest.mark.parametrize("chunk_size,temperature,vocab_major",
                         [(4, 1.0, False), (5, 0.7, False), (5, 0.7, True)])
def test_chunked_head_matches_direct(chunk_size, temperature, vocab_major):
    # 4 divides T = 12, 5 does not (padding); chunk > T is covered by the bfloat16 test.
    # vocab_major: the head passed as a tied embedding is stored, [V, D].
    hidden, weight, targets, cot_lp, cot_ent = _head_inputs()

    def chunked(h, w, tg, temp):
        if vocab_major:
            # The weight's gradient comes back through the transpose: [D, V] as the oracle's.
            return logprobs.token_logprobs_and_entropy(h, w.T, tg, chunk_size=chunk_size,
                                                       temperature=temp, vocab_major=True)
        return logprobs.token_logprobs_and_entropy(h, w, tg, chunk_size=chunk_size, temperature=temp)

    got = jax.jit(lambda *a: _values_and_grads(chunked, *a))(hidden, weight, targets, temperature,
                                                            cot_lp, cot_ent)
    ref = _direct_values_and_grads(hidden, weight, targets, temperature, cot_lp, cot_ent)
    assert got[0].shape == got[1].shape == (B, T) and got[0].dtype == got[1].dtype == jnp.float32
    for g, r in zip(got, ref):  # logp, entropy, grad hidden, grad weight
        np.testing.assert_allclose(g, r, rtol=RTOL, atol=1e-5)
    # Values also against an independent float64 NumPy computation.
    ref_lp, ref_ent = ref_head(hidden, weight, targets, temperature)
    np.testing.assert_allclose(got[0], ref_lp, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(got[1], ref_ent, rtol=RTOL, atol=1e-5)


def test_chunked_head_never_builds_full_logits():
    hidden, weight, targets, cot_lp, _ = _head_inputs()

    def f(h, w):
        lp, ent = logprobs.token_logprobs_and_entropy(h, w, targets, chunk_size=5)
        return jnp.sum(lp * cot_lp) + jnp.sum(ent)

    text = str(jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(hidden, weight))
    assert f"f32[{B},5,{V}]" in text  # per-chunk logits exist ...
    for length in (T, 15):  # ... but never for the whole (or padded) sequence.
        assert f"[{B},{length},{V}]" not in text
    assert f"[3,{B},5,{V}]" not in text  # nor stacked across chunks by the scan


def test_chunked_head_takes_its_sharding_constraint_as_an_argument():
    hidden, weight, targets, _, _ = _head_inputs()
    seen = []

    def constrain(x, logical_axes):
        seen.append((x.shape, tuple(logical_axes)))
        return x

    got = logprobs.token_logprobs_and_entropy(hidden, weight, targets, chunk_size=5,
                                              constrain=constrain)
    # Traced once inside the scan: each chunk's rows by batch, the head gathered over D.
    assert seen == [((B, 5, D), ("batch", "length", None)), ((D, V), (None, "vocab"))]
    ref = logprobs.token_logprobs_and_entropy(hidden, weight, targets, chunk_size=5)
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


def ref_head(hidden, weight, targets, temperature):
    """float64 NumPy logp at targets and entropy, per token."""
    logits = np.einsum("BTD,DV->BTV", np.float64(hidden), np.float64(weight)) / temperature
    logits -= logits.max(-1, keepdims=True)
    logp_all = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    logp = np.take_along_axis(logp_all, np.asarray(targets)[..., None], -1)[..., 0]
    return logp, -(np.exp(logp_all) * logp_all).sum(-1)


def test_chunked_head_bfloat16_compute():
    hidden, weight, targets, _, _ = _head_inputs()
    # chunk_size > T: one chunk of T tokens.
    lp, ent = jax.jit(lambda h, w: logprobs.token_logprobs_and_entropy(
        h, w, targets, chunk_size=64, compute_dtype=jnp.bfloat16))(hidden, weight)
    assert lp.dtype == ent.dtype == jnp.float32
    # Only the matmul inputs are rounded to bfloat16; the rest is float32.
    h16 = hidden.astype(jnp.bfloat16).astype(jnp.float32)
    w16 = weight.astype(jnp.bfloat16).astype(jnp.float32)
    ref_lp, ref_ent = ref_head(h16, w16, targets, 1.0)
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ent, ref_ent, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- metrics


def test_explained_variance():
    rng = np.random.default_rng(7)
    v = rng.normal(size=(3, 6)).astype(np.float32)
    r = (v + 0.3 * rng.normal(size=v.shape)).astype(np.float32)
    mask = multiturn_mask(rng, 3, 6)
    keep = mask.astype(bool)
    ref = 1 - np.var(r[keep] - v[keep]) / np.var(r[keep])
    np.testing.assert_allclose(losses.explained_variance(v, r, mask), ref, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(losses.explained_variance(r, r, mask), 1.0, rtol=RTOL)
    assert float(losses.explained_variance(v, jnp.ones_like(r), mask)) == 0.0
