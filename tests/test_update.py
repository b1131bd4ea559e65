"""The jitted policy / critic update steps on a tiny model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlver_jax.models import Qwen2Critic, create_model, get_preset
from rlver_jax.rl import advantages as adv_lib
from rlver_jax.rl.update import (TrainBatch, UpdateSettings, Updater, make_optimizer,
                                 shift_logprobs)

CONFIG = get_preset("tiny", vocab_size=61, hidden_size=32, intermediate_size=48,
                    num_heads=4, num_kv_heads=2)


def logprobs(updater, state, batch):
    """The trainer-side log-probs and entropies of a batch under the state's parameters."""
    return jax.jit(updater.forward_logprobs)(state.params, batch.tokens, batch.attention_mask)


def make_batch(seed=0, batch=4, length=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, size=(batch, length)).astype(np.int32)
    attention = np.ones((batch, length), np.int32)
    attention[1, -3:] = 0                       # right padding
    loss_mask = np.zeros((batch, length), np.int32)
    loss_mask[:, 4:7] = 1                        # a policy turn
    loss_mask[:, 9:11] = 1                       # a second turn after a user gap
    loss_mask *= attention
    advantages = np.where(np.arange(batch)[:, None] % 2 == 0, 1.0, -1.0) * loss_mask
    zeros = np.zeros((batch, length), np.float32)
    return TrainBatch(tokens=jnp.asarray(tokens), attention_mask=jnp.asarray(attention),
                      loss_mask=jnp.asarray(loss_mask), old_logp=jnp.asarray(zeros),
                      ref_logp=jnp.asarray(zeros), advantages=jnp.asarray(advantages, jnp.float32),
                      returns=jnp.asarray(zeros), old_values=jnp.asarray(zeros))


def test_shifted_logprobs_match_full_logits():
    model = create_model(CONFIG, 0)
    batch = make_batch()
    logp, _ = shift_logprobs(model, batch.tokens, batch.attention_mask, chunk=5, temperature=1.0)
    logits = model(batch.tokens, batch.attention_mask)
    direct = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                 batch.tokens[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(logp[:, 1:]), np.asarray(direct), atol=1e-5)
    assert np.all(np.asarray(logp[:, 0]) == 0)


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_micro_batching_equals_full_batch(agg_mode):
    model = create_model(CONFIG, 1)
    batch = make_batch(1)
    updaters = {}
    results = {}
    for micro in (0, 1, 2):
        settings = UpdateSettings(micro_batch_size=micro, agg_mode=agg_mode, entropy_coef=0.01)
        # Plain SGD: the parameter change is the gradient itself (Adam's first step is
        # ~sign(grad), which would hide or exaggerate rounding-level differences).
        updater = Updater(model, optax.sgd(1.0), settings)
        state = updater.init_state(model)
        old_logp, _ = logprobs(updater, state, batch)
        b = dataclasses.replace(batch, old_logp=old_logp)
        new_state, metrics = updater.step(state, b)
        results[micro] = (jax.tree.leaves(new_state.params), metrics)
        updaters[micro] = updater
    for micro in (1, 2):
        np.testing.assert_allclose(float(results[micro][1]["loss"]), float(results[0][1]["loss"]),
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(float(results[micro][1]["grad_norm"]),
                                   float(results[0][1]["grad_norm"]), rtol=1e-4)
        for a, b in zip(results[micro][0], results[0][0]):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_steps_raise_objective_and_positive_token_logprobs(algo):
    model = create_model(CONFIG, 2)
    batch = make_batch(2)
    if algo == "grpo":
        scores = jnp.array([1.0, 0.0, 0.8, 0.1])
        seq_adv = adv_lib.grpo(scores, jnp.array([0, 0, 1, 1]))
        batch = dataclasses.replace(
            batch, advantages=adv_lib.broadcast_sequence_advantage(seq_adv, batch.loss_mask))
    updater = Updater(model, make_optimizer(3e-3, 100), UpdateSettings(entropy_coef=0.0))
    state = updater.init_state(model)
    old_logp, _ = logprobs(updater, state, batch)
    batch = dataclasses.replace(batch, old_logp=old_logp)
    mask = np.asarray(batch.loss_mask) > 0
    pos = mask & (np.asarray(batch.advantages) > 0)
    neg = mask & (np.asarray(batch.advantages) < 0)
    surrogate = lambda lp: float(np.sum(np.exp(np.asarray(lp) - np.asarray(old_logp))
                                        * np.asarray(batch.advantages) * mask))
    before = np.asarray(old_logp)
    for _ in range(4):
        state, metrics = updater.step(state, batch)
        assert float(metrics["skipped"]) == 0
    after, _ = logprobs(updater, state, batch)
    after = np.asarray(after)
    assert after[pos].mean() > before[pos].mean() + 1e-3
    assert after[neg].mean() < before[neg].mean() - 1e-3
    assert surrogate(after) > surrogate(before)
    assert int(state.step) == 4


def test_nan_step_is_skipped_and_state_kept():
    model = create_model(CONFIG, 3)
    batch = make_batch(3)
    updater = Updater(model, make_optimizer(1e-2, 10), UpdateSettings())
    state = updater.init_state(model)
    before = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    bad = dataclasses.replace(batch, advantages=batch.advantages.at[0, 5].set(jnp.nan))
    state, metrics = updater.step(state, bad)
    assert float(metrics["skipped"]) == 1
    assert int(state.step) == 0
    for a, b in zip(before, jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_critic_step_reduces_value_loss():
    critic = create_model(CONFIG, 4, cls=Qwen2Critic)
    batch = make_batch(4)
    returns = jnp.where(batch.loss_mask > 0, 0.7, 0.0)
    updater = Updater(critic, make_optimizer(1e-2, 100), UpdateSettings(value_clip=None),
                      kind="critic")
    state = updater.init_state(critic)
    batch = dataclasses.replace(batch, returns=returns)
    losses = []
    for _ in range(5):
        old_values = jax.jit(updater.forward_values)(state.params, batch.tokens,
                                                        batch.attention_mask)
        batch = dataclasses.replace(batch, old_values=old_values)
        state, metrics = updater.step(state, batch)
        losses.append(float(metrics["value_loss"]))
    assert losses[-1] < losses[0] * 0.5


def _swiglu_value_and_grads(fn, dtype):
    keys = jax.random.split(jax.random.key(0), 5)
    h = jax.random.normal(keys[0], (2, 7, 16), dtype)
    w_gate, w_up = (jax.random.normal(k, (16, 24), dtype) for k in keys[1:3])
    w_down = jax.random.normal(keys[3], (24, 16), dtype) * 0.3
    cot = jax.random.normal(keys[4], (2, 7, 16), jnp.float32)

    def f(*args):
        return jnp.sum(fn(*args).astype(jnp.float32) * cot)
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(h, w_gate, w_up, w_down)


def _swiglu_einsums(h, wg, wu, wd):
    gate, up = jnp.einsum("BTD,DF->BTF", h, wg), jnp.einsum("BTD,DF->BTF", h, wu)
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, wd)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_swiglu_mlp_matches_autodiff_of_the_einsums(dtype, tol):
    from rlver_jax.models.projections import swiglu_mlp

    (got, got_grads) = _swiglu_value_and_grads(swiglu_mlp, dtype)
    (ref, ref_grads) = _swiglu_value_and_grads(_swiglu_einsums, dtype)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    for g, r in zip(got_grads, ref_grads):   # d h, d w_gate, d w_up, d w_down
        assert g.shape == r.shape and g.dtype == r.dtype == dtype
        scale = float(jnp.max(jnp.abs(r.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32),
                                   rtol=tol, atol=tol * scale)


def test_swiglu_mlp_saves_only_its_matmul_inputs_and_outputs():
    """The backward's residuals: h (transposed), gate, up and the three weights; autodiff
    of the einsums also saves the SiLU's intermediates and the gated product."""
    from rlver_jax.models.projections import swiglu_mlp

    args = (jnp.ones((2, 7, 16)), jnp.ones((16, 24)), jnp.ones((16, 24)), jnp.ones((24, 16)))
    sizes = lambda fn: sorted(r.size for r in jax.tree.leaves(jax.vjp(fn, *args)[1]))
    assert sizes(swiglu_mlp) == sorted([14 * 16, 14 * 24, 14 * 24, 16 * 24, 16 * 24, 24 * 16])
    assert sum(s == 14 * 24 for s in sizes(_swiglu_einsums)) > 2
