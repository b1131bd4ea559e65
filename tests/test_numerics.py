"""The dtype story: float32 master weights, bf16 compute, float32 optimiser state.

A trained model stores its weights in `param_dtype` (float32) and computes in `dtype`
(bfloat16 in the reference config). At the reference run's learning rate of 1e-6, bf16
master weights lose the update: bf16's spacing near a weight of 0.02 is ~1.2e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rlver_jax.models import Qwen2, compute_dtype_copy, get_preset
from rlver_jax.rl.update import (TrainBatch, UpdateSettings, Updater, _accumulate,
                                 _split_micro, make_optimizer, shift_logprobs)

# The tiny preset at test size; normal(0.02) init as the real presets.
BASE = get_preset("tiny", vocab_size=61, hidden_size=32, intermediate_size=48,
                  num_heads=4, num_kv_heads=2)
LR = 1e-6


def make_batch(vocab, batch=4, length=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(batch, length)).astype(np.int32)
    loss_mask = np.zeros((batch, length), np.int32)
    loss_mask[:, 6:] = 1
    advantages = rng.normal(size=(batch, length)).astype(np.float32) * loss_mask
    # A near-uniform random model: log p ~ -log V, so every ratio starts near 1 (inside
    # the clip range, every token has a gradient) without a separate log-prob program.
    old_logp = np.full((batch, length), -np.log(vocab), np.float32)
    zeros = np.zeros((batch, length), np.float32)
    return TrainBatch(tokens=jnp.asarray(tokens), attention_mask=jnp.ones_like(tokens),
                      loss_mask=jnp.asarray(loss_mask), old_logp=jnp.asarray(old_logp),
                      ref_logp=jnp.asarray(zeros), advantages=jnp.asarray(advantages),
                      returns=jnp.asarray(zeros), old_values=jnp.asarray(zeros))


def random_model(config, seed=0):
    """Weights drawn in NumPy as normal(0, 0.02) (norms 1, as the presets initialise), then
    stored in `config.param_dtype`: the same starting point whatever the dtypes, without
    compiling `create_model`'s jitted init."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        value = (np.ones(var.shape) if "norm" in str(path[-1])
                 else rng.normal(0.0, 0.02, var.shape))
        var.set_value(jnp.asarray(value, jnp.float32).astype(var.dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def layer_arrays(params) -> dict[str, np.ndarray]:
    return {"/".join(map(str, path)): np.asarray(jnp.asarray(v, jnp.float32))
            for path, v in nnx.to_flat_state(params["layers"])}


def one_adamw_step(param_dtype: str, dtype: str):
    """(before, after, first moment) of the decoder layers after one AdamW step at lr 1e-6
    (the reference optimiser: weight decay 0.01, grad clip 1.0), from the same initial
    weights whatever the dtypes."""
    config = BASE.replace(param_dtype=param_dtype, dtype=dtype)
    model = random_model(config)
    updater = Updater(model, make_optimizer(LR, 10, weight_decay=0.01),
                      UpdateSettings(entropy_coef=0.0))
    state = updater.init_state(model)
    before = layer_arrays(state.params)
    state, metrics = updater.step(state, make_batch(config.vocab_size))
    assert metrics["skipped"] == 0
    adam = state.opt_state[1].inner_state[0]
    return before, layer_arrays(state.params), layer_arrays(adam.mu), state


@pytest.fixture(scope="module")
def steps():
    return {dtypes: one_adamw_step(*dtypes) for dtypes in
            [("float32", "float32"), ("float32", "bfloat16"), ("bfloat16", "bfloat16")]}


def test_float32_masters_take_a_1e_6_step_that_bf16_masters_lose(steps):
    for dtypes, expect_changed in [(("float32", "bfloat16"), 0.99), (("float32", "float32"), 0.99)]:
        before, after, mu, _ = steps[dtypes]
        got = np.concatenate([(after[k] != before[k])[mu[k] != 0] for k in before])
        assert got.size > 0.99 * sum(v.size for v in before.values())  # nearly all have a grad
        assert got.mean() >= expect_changed, (dtypes, got.mean())
    # The old behaviour (masters in bf16, as `dtype` set both before): the update rounds
    # away except for the few weights within ~2.5e-4 of zero (measured 2.2% changed).
    before, after, mu, _ = steps[("bfloat16", "bfloat16")]
    old = np.concatenate([(after[k] != before[k])[mu[k] != 0] for k in before])
    assert old.mean() < 0.1, old.mean()


def test_bf16_compute_step_agrees_with_an_all_float32_step(steps):
    """Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g) per weight, so the mixed
    step equals the float32 one wherever the bf16-compute gradient keeps the float32
    gradient's sign. bf16 matmul inputs (8-bit mantissa, ~0.4% relative error per
    rounding, a few % after a backward pass) flip only components within that noise of
    zero: measured 0.2% of the layer weights, a relative L2 difference of 0.09 (2 *
    sqrt(0.002)). Tolerances: >= 99% equal signs and relative L2 <= 0.2. The k bias is left
    out: its exact gradient is 0 (a per-query constant added to every score cancels in the
    softmax), so both steps follow rounding noise there."""
    b32, a32, _, _ = steps[("float32", "float32")]
    bmix, amix, _, _ = steps[("float32", "bfloat16")]
    names = [k for k in b32 if k != "k_bias"]
    assert all(np.array_equal(b32[k], bmix[k]) for k in names)  # same starting point
    d32 = np.concatenate([(a32[k] - b32[k]).ravel() for k in names])
    dmix = np.concatenate([(amix[k] - bmix[k]).ravel() for k in names])
    # Each weight moves by ~lr (fp32 rounding of w + lr adds up to ~1.5e-8 at |w| ~ 0.2).
    assert np.abs(d32).max() <= 1.05 * LR and np.median(np.abs(d32)) > 0.9 * LR
    assert np.mean(np.sign(dmix) == np.sign(d32)) >= 0.99
    assert np.linalg.norm(dmix - d32) / np.linalg.norm(d32) <= 0.2


def test_moments_and_accumulated_gradients_are_float32(steps):
    _, _, _, state = steps[("float32", "bfloat16")]
    adam = state.opt_state[1].inner_state[0]
    for tree in (adam.mu, adam.nu, state.params):
        assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(jnp.float32)}
    # The micro-batch accumulation scan (bf16 compute): its gradient sum is float32.
    config = BASE.replace(dtype="bfloat16")
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0))))
    batch = make_batch(config.vocab_size)

    def loss_fn(params, mb):
        logp, _ = shift_logprobs(nnx.merge(graphdef, params), mb.tokens, mb.attention_mask,
                                 8, 1.0)
        return jnp.sum(logp * mb.loss_mask), {}

    _, _, grads = jax.eval_shape(lambda p: _accumulate(loss_fn, p, _split_micro(batch, 2)),
                                 state.params)
    assert {x.dtype for x in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_sampling_copy_is_in_the_compute_dtype():
    config = BASE.replace(param_dtype="float32", dtype="bfloat16")
    model = random_model(config)
    copy = compute_dtype_copy(model)
    assert {x.dtype for x in jax.tree.leaves(nnx.state(copy))} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}
    same = BASE.replace(param_dtype="float32", dtype="float32")
    model32 = random_model(same)
    shared = compute_dtype_copy(model32)
    assert shared.embed[...] is model32.embed[...]  # nothing to cast: the arrays are shared
