"""One process of the two-process CPU test (run by tests/test_multihost.py, not by pytest).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR

Joins a job over localhost, builds a tiny policy on a global (data=2, fsdp=2) mesh that
spans both processes, runs a few update steps, saves an Orbax checkpoint, restores it
and writes WORKDIR/result_<PROCESS_ID>.json for the test to compare.
"""

import faulthandler
import json
import os
import sys
import time

# Each process brings 2 fake CPU devices; must precede the first `import jax`. The
# optimisation-level flags halve XLA:CPU compile time, which dominates this test.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=2"
                           + " --xla_backend_optimization_level=0"
                           + " --xla_llvm_disable_expensive_passes=true").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rlver_jax import distributed  # noqa: E402

STEPS = 3
_START = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def main(process_id: int, num_processes: int, port: int, workdir: str) -> None:
    # A hung collective would otherwise block silently until the test kills us.
    faulthandler.dump_traceback_later(float(os.environ.get("RLVER_WORKER_TIMEOUT", "140")),
                                      exit=True)
    log("initialize")
    distributed.maybe_initialize(f"localhost:{port}", num_processes, process_id)
    distributed.maybe_initialize(f"localhost:{port}", num_processes, process_id)  # idempotent
    jax.config.update("jax_default_matmul_precision", "highest")

    import orbax.checkpoint as ocp
    from flax import nnx
    from rlver_jax import sharding as shd
    from rlver_jax.models import create_model, get_preset
    from rlver_jax.rl.update import (TrainBatch, UpdateSettings, Updater, init_train_state,
                                     make_optimizer)

    assert jax.process_count() == num_processes and jax.device_count() == 2 * num_processes
    log(f"{jax.device_count()} devices; building the model")
    config = get_preset("tiny", vocab_size=128, hidden_size=32, intermediate_size=64)
    mesh = shd.make_mesh((2, -1, 1))
    model = create_model(config, 0, mesh=mesh)
    tx = make_optimizer(1e-3, 10)
    # One jitted init for the whole train state: eager per-leaf copies would each be a
    # separate multi-process compile.
    graphdef, weights = nnx.split(model)
    init = lambda w: init_train_state(nnx.merge(graphdef, w), tx)
    state_shardings = shd.tree_shardings(jax.eval_shape(init, weights), mesh)
    state = jax.jit(init, out_shardings=state_shardings)(weights)
    updater = Updater(model, tx, UpdateSettings(), state_shardings=state_shardings)

    # Every process knows the whole (deterministic) batch and hands JAX its own rows.
    rng = np.random.default_rng(0)
    b, t = 8, 16
    host = {
        "tokens": rng.integers(0, config.vocab_size, (b, t)).astype(np.int32),
        "attention_mask": np.ones((b, t), np.int32),
        "loss_mask": np.tile((np.arange(t) >= 8).astype(np.int32), (b, 1)),
        "old_logp": np.full((b, t), -4.8, np.float32),
        "ref_logp": np.zeros((b, t), np.float32),
        "advantages": rng.normal(size=(b, t)).astype(np.float32),
        "returns": np.zeros((b, t), np.float32),
        "old_values": np.zeros((b, t), np.float32),
    }
    rows = shd.batch_sharding(mesh, 2, batch_size=b)
    batch = TrainBatch(**{k: jax.make_array_from_callback(v.shape, rows, lambda i, v=v: v[i])
                          for k, v in host.items()})
    assert not batch.tokens.is_fully_addressable  # really a global array

    log("update steps")
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(STEPS):
            state, metrics = updater.step(state, batch)
            losses.append(float(metrics["loss"]))

    # Per-leaf checksums, computed on device (the arrays span both processes).
    checksum = jax.jit(lambda tree: [x.astype(np.float32).sum() for x in jax.tree.leaves(tree)])
    sums = [float(x) for x in checksum(state.params)]

    # Host data in and out: each process contributes its own 2 rows of a global batch,
    # whatever the batch sharding: rows split by process (no exchange), replicated, or
    # split over the in-host fsdp axis only (both need the rows of the other process).
    mine = np.arange(2 * 3, dtype=np.int32).reshape(2, 3) + 100 * process_id
    rows_check = {}
    for layout, rules in (("process_blocks", None), ("replicated", {"batch": None}),
                          ("fsdp_only", {"batch": "fsdp"})):
        both = distributed.global_rows(mine, mesh, rules)
        rows_check[layout] = {
            "global_shape": list(both.shape),
            "global_rows": jax.jit(lambda x: x[:, 0], out_shardings=shd.replicated(mesh))(
                both).tolist(),
            "local_back": distributed.local_rows(both).tolist() == mine.tolist()}
    rows_check["agree"] = [distributed.max_over_processes(process_id + 5),
                           distributed.any_process(process_id == 1),
                           distributed.all_processes(process_id == 1)]
    rows_check["gathered"] = distributed.gather_objects({"p": process_id, "x": "y" * process_id})

    log("checkpoint")
    manager = ocp.CheckpointManager(os.path.join(workdir, "ckpt"),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=2))
    manager.save(STEPS, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    abstract = shd.abstract_with_shardings(jax.eval_shape(lambda s: s, state), state_shardings)
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    restored_sums = [float(x) for x in checksum(restored.params)]
    same = jax.jit(lambda a, b: jax.numpy.all(jax.numpy.stack(
        [jax.numpy.all(x == y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))])))
    result = {
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "is_main": distributed.is_main_process(), "losses": losses, "param_sums": sums,
        "restored_sums": restored_sums,
        "restored_equal": bool(same(state.params, restored.params)),
        "restored_step": int(manager.latest_step()),
        "restored_sharding_ok": all(
            r.sharding.is_equivalent_to(s.sharding, r.ndim) for r, s in
            zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params))),
        "profiles": distributed.host_shard(list(range(10))),
        "rows": rows_check,
    }
    with open(os.path.join(workdir, f"result_{process_id}.json"), "w") as f:
        json.dump(result, f)
    manager.close()
    log("done")


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
