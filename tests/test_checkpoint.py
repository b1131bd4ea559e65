"""Orbax checkpoints: round trips (f32, bf16, onto a mesh), retention, crash safety, errors."""

import functools
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from rlver_jax.checkpoint import (CheckpointError, Checkpointer, PreemptionGuard,
                                  abstract_like)
from rlver_jax.models import PRESETS, Qwen2
from rlver_jax.sharding import make_mesh, param_shardings

CONFIG = PRESETS["tiny"].replace(vocab_size=128, hidden_size=32, intermediate_size=64,
                                 num_heads=4, num_kv_heads=2, num_layers=2)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_tx():
    """AdamW with injected hyper-parameters, as `make_optimizer` (minus the clipping, whose
    compile doubles this file's run time). Hyper-parameters stay float32: cast to bfloat16,
    b2=0.999 rounds to 1 and Adam's bias correction divides by zero."""
    return optax.inject_hyperparams(optax.adamw, hyperparam_dtype=jnp.float32)(
        learning_rate=1e-3, weight_decay=0.01)


def abstract_params(config=CONFIG):
    return nnx.state(nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0))), nnx.Param)


def random_params(config=CONFIG, seed=0):
    """Random parameters from numpy: `create_model`'s jitted RNG init compiles for ~20 s
    on a busy 2-core CPU, and the values do not matter here."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype),
                        abstract_params(config))


@functools.cache
def trained_state(param_dtype="float32", seed=0):
    """Params and AdamW state after one update, so that mu/nu/count are non-trivial."""
    params = random_params(CONFIG.replace(param_dtype=param_dtype), seed)
    tx = make_tx()

    @jax.jit
    def update(params):
        opt = tx.init(params)
        grads = jax.tree.map(lambda p: jnp.cos(p) * 0.1, params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    return update(params)


def host(tree):
    return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


META = {"config": {"lr": 1e-3, "name": "tiny"}, "seed": 7, "data_cursor": [3, 14]}


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_round_trip_params_and_adamw_state(tmp_path, param_dtype):
    params, opt = jax.tree.map(jnp.copy, trained_state(param_dtype))  # deleted below
    expected = host({"policy_params": params, "policy_opt": opt})
    targets = {"policy_params": abstract_like(params), "policy_opt": abstract_like(opt)}
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=2, async_save=True)
    assert ckpt.save(3, {"policy_params": params, "policy_opt": opt}, META)
    # The save returned before the files are written; the arrays may be donated now.
    for leaf in jax.tree.leaves((params, opt)):
        leaf.delete()
    ckpt.close()

    fresh = Checkpointer(tmp_path / "ckpt", save_every=1, keep=2)
    assert fresh.latest_step() == 3 and fresh.all_steps() == [3]
    step, restored, meta = fresh.restore(targets=targets)
    assert step == 3 and meta == META
    assert isinstance(restored["policy_params"], nnx.State)
    assert_trees_equal(restored, expected)
    assert restored["policy_params"]["embed"][...].dtype == jnp.dtype(param_dtype)
    assert fresh.restore_meta(3) == META


def test_bf16_masters_of_an_old_checkpoint_restore_as_float32_with_a_note(tmp_path):
    """Checkpoints written before float32 masters hold bf16 params and moments: a float32
    run restores them cast up (exactly: bf16 -> f32 is lossless) and says so in one line."""
    from rlver_jax.workdir import master_dtype_note
    params, opt = trained_state("bfloat16")
    old_meta = {"policy_model": {"param_dtype": "bfloat16", "dtype": "bfloat16"}}
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, keep=1, async_save=False)
    assert ckpt.save(1, {"policy_params": params, "policy_opt": opt}, old_meta)
    f32 = lambda tree: jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32 if jnp.issubdtype(
            x.dtype, jnp.floating) else x.dtype), tree)
    _, restored, meta = ckpt.restore(targets={"policy_params": f32(params),
                                              "policy_opt": f32(opt)})
    ckpt.close()
    for got, saved in zip(jax.tree.leaves(restored["policy_params"]), jax.tree.leaves(params)):
        assert got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), np.asarray(saved, np.float32))
    note = master_dtype_note(meta, "policy_model", CONFIG.replace(param_dtype="float32"))
    assert note == ("checkpoint policy weights are stored in bfloat16; continuing with "
                    "float32 master weights (cast on restore)")
    assert master_dtype_note(meta, "policy_model", CONFIG.replace(param_dtype="bfloat16")) is None


def test_restore_onto_mesh_lands_sharded(tmp_path):
    mesh = make_mesh((2, 2, 2))
    params, opt = trained_state()           # saved from one device
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, {"policy_params": params, "policy_opt": opt}, META)

    abstract = abstract_params()
    shardings = param_shardings(abstract, mesh)
    target_params = abstract_like(abstract, shardings)
    # As a trainer builds it: the state of a sharded init. Its scalars are stripped of
    # their sharding (as from `jax.eval_shape`; an init puts them on one device): they
    # must land replicated on the mesh, next to the parameters.
    sharded_init = make_tx().init(jax.device_put(params, shardings))
    target_opt = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if x.ndim else None),
        sharded_init)
    _, restored, _ = ckpt.restore(targets={"policy_params": target_params,
                                           "policy_opt": target_opt})
    assert_trees_equal(host(restored["policy_params"]), host(params))
    assert_trees_equal(host(restored["policy_opt"]), host(opt))
    for got, want in zip(jax.tree.leaves(restored["policy_params"]),
                         jax.tree.leaves(shardings)):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    embed = restored["policy_params"]["embed"][...]
    assert embed.sharding.spec == P("tensor", "fsdp") and len(embed.addressable_shards) == 8
    replicated = NamedSharding(mesh, P())
    for got, want in zip(jax.tree.leaves(restored["policy_opt"]), jax.tree.leaves(sharded_init)):
        assert got.sharding.is_equivalent_to(want.sharding if got.ndim else replicated, got.ndim)

    # And back: a sharded save restores onto one device.
    ckpt.save(2, {"policy_params": restored["policy_params"]}, META)
    _, back, _ = ckpt.restore(2, targets={"policy_params": abstract_like(params)})
    assert_trees_equal(host(back["policy_params"]), host(params))
    assert len(back["policy_params"]["embed"][...].devices()) == 1
    ckpt.close()


def test_save_every_keep_last_k_and_force(tmp_path):
    params, _ = trained_state()
    ckpt = Checkpointer(tmp_path, save_every=2, keep=2, async_save=True)
    for step in range(1, 10):
        assert ckpt.save(step, {"p": params}, {"step": step}) == (step % 2 == 0)
    ckpt.wait()
    assert ckpt.all_steps() == [6, 8]
    assert not ckpt.save(4, {"p": params}, {"step": 4})  # behind the latest: never resaved
    assert ckpt.save(9, {"p": params}, {"step": 9}, force=True)     # pre-emption save
    assert not ckpt.save(9, {"p": params}, {"step": 9}, force=True)  # already there
    ckpt.close()
    reopened = Checkpointer(tmp_path, save_every=2, keep=2)
    assert reopened.all_steps() == [8, 9] and reopened.latest_step() == 9
    assert reopened.restore_meta() == {"step": 9}
    assert reopened.restore_meta(8) == {"step": 8}


def test_restore_subset_of_items(tmp_path):
    params, opt = trained_state()
    critic = random_params(seed=1)
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(4, {"policy_params": params, "policy_opt": opt, "critic_params": critic}, META)
    assert ckpt.items_at(4) == ["critic_params", "policy_opt", "policy_params"]
    targets = {"policy_params": abstract_like(params), "policy_opt": abstract_like(opt),
               "critic_params": abstract_like(critic)}
    _, restored, _ = ckpt.restore(targets=targets, items=["critic_params"])
    assert list(restored) == ["critic_params"]
    assert_trees_equal(host(restored["critic_params"]), host(critic))
    _, restored, _ = ckpt.restore(targets={"policy_params": abstract_like(params)})
    assert list(restored) == ["policy_params"]
    ckpt.close()


_CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax.numpy as jnp
    from rlver_jax.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], async_save=True)
    ckpt.save(1, {"w": {"a": jnp.arange(1000, dtype=jnp.float32)}}, {"step": 1})
    ckpt.wait()
    big = jnp.ones((4096, 8192), jnp.float32)  # 128 MiB: the write takes a while
    ckpt.save(2, {"w": {"a": big}}, {"step": 2})
    print("saving", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # dies while step 2 is being written
""")


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="")
    proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "saving" in proc.stdout
    assert "2" not in os.listdir(tmp_path)  # step 2 never reached its final name

    target = {"a": jax.ShapeDtypeStruct((1000,), jnp.float32)}
    reader = Checkpointer(tmp_path, read_only=True)
    assert reader.latest_step() == 1
    step, restored, meta = reader.restore(targets={"w": target})
    assert step == 1 and meta == {"step": 1}
    np.testing.assert_array_equal(restored["w"]["a"], np.arange(1000, dtype=np.float32))

    # A writer removes the debris (in the background, awaited by its first save) and can
    # save step 2 again.
    writer = Checkpointer(tmp_path, async_save=False)
    assert writer.save(2, {"w": {"a": jnp.zeros(1000)}}, {"step": 2})
    writer.close()
    assert writer.all_steps() == [1, 2]
    assert not [n for n in os.listdir(tmp_path) if "tmp" in n]


def test_partial_tmp_directory_is_ignored(tmp_path):
    params, _ = trained_state()
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, {"p": params}, {"step": 1})
    ckpt.close()
    # What a crash mid-save leaves behind: a half-written step under a temporary name.
    partial = tmp_path / "2.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(tmp_path / "1", partial)
    for marker in ("commit_success.txt", "_CHECKPOINT_METADATA"):
        (partial / marker).unlink(missing_ok=True)
    shutil.rmtree(partial / "p")
    reader = Checkpointer(tmp_path, read_only=True)
    assert reader.all_steps() == [1]
    _, restored, _ = reader.restore(targets={"p": abstract_like(params)})
    assert_trees_equal(host(restored["p"]), host(params))
    assert partial.exists()  # a reader never deletes (a trainer may be writing)


def test_errors_name_what_is_wrong(tmp_path):
    params, _ = trained_state()
    empty = Checkpointer(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"no checkpoints in .*empty"):
        empty.restore(targets={"p": abstract_like(params)})
    with pytest.raises(CheckpointError, match="no checkpoints in"):
        empty.restore_meta()

    ckpt = Checkpointer(tmp_path / "c", async_save=False)
    ckpt.save(5, {"p": params}, {"step": 5})
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 7 .*available steps: \[5\]"):
        ckpt.restore(7, targets={"p": abstract_like(params)})
    with pytest.raises(CheckpointError, match=r"no item 'q'.*\['p'\]"):
        ckpt.restore(targets={"q": abstract_like(params)})

    wide = abstract_params(CONFIG.replace(intermediate_size=96))
    with pytest.raises(CheckpointError, match=r"item 'p' key 'layers/down_kernel/value'.*"
                                              r"saved shape \(2, 64, 32\), target shape "
                                              r"\(2, 96, 32\)"):
        ckpt.restore(targets={"p": abstract_like(wide)})
    untied = abstract_params(CONFIG.replace(tie_word_embeddings=False))
    with pytest.raises(CheckpointError, match=r"keys only in the target: \['lm_head/value'\]"):
        ckpt.restore(targets={"p": abstract_like(untied)})
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        ckpt.save(6, {"p": params}, {"bad": object()})
    with pytest.raises(ValueError, match="reserved"):
        ckpt.save(6, {"meta": params}, {})
    ckpt.close()
    with pytest.raises(CheckpointError, match="read-only"):
        Checkpointer(tmp_path / "c", read_only=True).save(8, {"p": params}, {})


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_preemption_guard_sets_flag_and_restores_handlers(signum):
    before = signal.getsignal(signum)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(0)
        os.kill(os.getpid(), signum)
        for _ in range(1000):  # the Python-level handler runs at the next bytecode
            if guard.requested:
                break
        assert guard.requested and guard.signal_received == signum
        assert guard.should_stop(1)
    assert signal.getsignal(signum) is before
