"""Sharded forward, sampling and update steps equal the single-device results (8 fake CPUs)."""

import contextlib
import functools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from rlver_jax import sharding as shd
from rlver_jax.models import create_model, get_preset
from rlver_jax.rl.update import TrainBatch, UpdateSettings, Updater
from rlver_jax.sampling import Sampler

CONFIG = get_preset("tiny", vocab_size=256)
MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4)]
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [3] * 7, [4, 5], [6], [7, 8, 9], [1, 2]]
STEPS = 2


def make_batch(batch=8, length=16, seed=0) -> TrainBatch:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, size=(batch, length)).astype(np.int32)
    attention = np.ones((batch, length), np.int32)
    attention[1, -4:] = 0
    loss_mask = np.zeros((batch, length), np.int32)
    loss_mask[:, 6:12] = 1
    loss_mask *= attention
    advantages = (np.where(np.arange(batch)[:, None] % 2 == 0, 1.0, -0.5) * loss_mask)
    zeros = np.zeros((batch, length), np.float32)
    return TrainBatch(tokens=tokens, attention_mask=attention, loss_mask=loss_mask,
                      old_logp=zeros - 1.0, ref_logp=zeros,
                      advantages=advantages.astype(np.float32), returns=zeros,
                      old_values=zeros)


@functools.cache
def single_device_model():
    return create_model(CONFIG, 0)


def run_everything(mesh):
    """Greedy samples and STEPS update steps (the forward pass is checked through the
    sampler's log-probs and the step's loss), on `mesh` (None: one device)."""
    model = single_device_model()
    if mesh is not None:
        # Device-to-device move into the training layout (cheaper to compile than a
        # sharded init per mesh; `create_model(mesh=...)` is covered by test_multihost).
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, shd.reshard(state, shd.tree_shardings(state, mesh)))
    batch = make_batch()
    # Momentum SGD: linear in the gradient, so rounding-level differences stay small
    # (Adam's first step is ~sign(grad)); its trace tree exercises the opt-state layout.
    tx = optax.sgd(0.5, momentum=0.9)
    updater = Updater(model, tx, UpdateSettings(entropy_coef=0.01))
    state = updater.init_state(model)
    if mesh is not None:
        shardings = shd.tree_shardings(state, mesh)
        updater = Updater(model, tx, UpdateSettings(entropy_coef=0.01),
                          state_shardings=shardings)
        state = shd.reshard(state, shardings)
        rows = shd.batch_sharding(mesh, 2, batch_size=batch.tokens.shape[0])
        batch = jax.device_put(batch, rows)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        if mesh is None:
            sample_model, sampler = model, Sampler(model)
            out = sampler.generate(sample_model, PROMPTS, max_new_tokens=6)
        else:
            with shd.logical_rules(shd.get_rules("sampling")):
                sample_model = shd.sampling_model(model, mesh)
                out = Sampler(sample_model, mesh=mesh).generate(sample_model, PROMPTS,
                                                                max_new_tokens=6)
        losses = []
        for _ in range(STEPS):
            state, metrics = updater.step(state, batch)
            losses.append(float(metrics["loss"]))
    return dict(model=model, sample_model=sample_model, tokens=out.tokens,
                logprobs=out.raw_logprobs, losses=losses, state=state)


@pytest.fixture(scope="module")
def reference():
    return run_everything(None)


def _check_layout(tree, mesh, rules):
    """Every Variable with logical axes sits on `mesh` with the spec its axes give."""
    count = 0
    for var in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        if not isinstance(var, nnx.Variable) or getattr(var, "logical_axes", None) is None:
            continue
        value = var.get_value()
        expected = shd.logical_to_spec(var.logical_axes, value.shape, dict(mesh.shape), rules)
        assert value.sharding.mesh.shape == mesh.shape
        assert value.sharding.spec == expected, (var.logical_axes, value.sharding.spec)
        count += 1
    return count


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_sharded_matches_single_device(reference, mesh_shape):
    mesh = shd.make_mesh(mesh_shape)
    got = run_everything(mesh)
    rules = shd.get_rules("fsdp_tensor")

    n_params = _check_layout(nnx.state(got["model"], nnx.Param), mesh, rules)
    assert n_params == len(jax.tree.leaves(nnx.state(got["model"], nnx.Param)))
    _check_layout(nnx.state(got["sample_model"]), mesh, shd.get_rules("sampling"))
    # The updated params and the optimiser's momentum keep the training layout.
    _check_layout(got["state"].params, mesh, rules)
    _check_layout(got["state"].opt_state, mesh, rules)

    assert got["tokens"] == reference["tokens"]
    for a, b in zip(got["logprobs"], reference["logprobs"]):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(got["losses"], reference["losses"], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got["state"].params),
                    jax.tree.leaves(reference["state"].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_rules_presets_and_config_overrides():
    mesh = shd.make_mesh((2, 2, 2))
    shape = dict(mesh.shape)
    # q_kernel [L, D, N, H]: FSDP + tensor splits D over fsdp, heads over tensor.
    axes, dims = ("layers", "embed", "heads", "head_dim"), (2, 64, 4, 16)
    assert shd.logical_to_spec(axes, dims, shape, shd.get_rules("fsdp_tensor")) == \
        jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert shd.logical_to_spec(axes, dims, shape, shd.get_rules("fsdp")) == \
        jax.sharding.PartitionSpec(None, ("fsdp", "tensor"), None, None)
    assert shd.logical_to_spec(axes, dims, shape, shd.get_rules("sampling")) == \
        jax.sharding.PartitionSpec(None, None, "tensor", None)
    # A config mapping overrides entries of the base table; lists become tuples.
    table = shd.get_rules({"mlp": ["fsdp", "tensor"], "embed": None})
    assert table["mlp"] == ("fsdp", "tensor") and table["embed"] is None
    assert table["heads"] == "tensor"
    with pytest.raises(KeyError, match="unknown sharding rules"):
        shd.get_rules("nope")
    with pytest.raises(KeyError, match="unknown mesh axis"):
        shd.get_rules({"mlp": "model"})
    assert dict(shd.make_mesh((2, -1, 2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_reshard_round_trip_keeps_values():
    mesh = shd.make_mesh((1, 4, 2))
    state = nnx.state(single_device_model())
    state = shd.reshard(state, shd.tree_shardings(state, mesh))
    sampling = shd.reshard(state, shd.tree_shardings(state, mesh, shd.get_rules("sampling")))
    back = shd.reshard(sampling, shd.tree_shardings(state, mesh))
    # Sampling layout: no weight is split over fsdp; the embedding stays vocab x tensor.
    assert all("fsdp" not in str(x.sharding.spec) for x in jax.tree.leaves(sampling))
    assert sampling["embed"].get_value().sharding.spec == jax.sharding.PartitionSpec("tensor", None)
    for a, c in zip(jax.tree.leaves(state), jax.tree.leaves(back)):
        assert c.sharding.is_equivalent_to(a.sharding, a.ndim)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
