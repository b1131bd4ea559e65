"""Multi-host start-up: one JAX process per host, joined into one global device mesh.

`maybe_initialize()` must run before anything touches a JAX backend (before the first
`jax.devices()`, array or jit call). It calls `jax.distributed.initialize` when the
environment says that this process is one of several:

- explicit arguments, or the variables `RLVER_COORDINATOR` (host:port),
  `RLVER_NUM_PROCESSES`, `RLVER_PROCESS_ID` (the multi-GPU launcher sets these);
- `RLVER_DISTRIBUTED=1`: let JAX detect the cluster itself (the TPU pod launcher sets it;
  on a TPU VM JAX reads the worker list from the TPU metadata);
- a TPU pod slice (`TPU_WORKER_HOSTNAMES` with more than one host, `MEGASCALE_*`);
- SLURM with more than one task (`SLURM_NTASKS` / `SLURM_STEP_NUM_TASKS` > 1) and Open MPI
  (`OMPI_COMM_WORLD_SIZE` > 1), which JAX's cluster detection understands.

Otherwise it does nothing: a single process needs no coordinator. After initialization
every process sees all devices in `jax.devices()`; arrays are global, and each process
feeds its own part of the batch (`host_shard`). Only process 0 writes logs and metrics
(`is_main_process`); Orbax checkpoints are written by all processes together. Host data
enters and leaves the global arrays through `global_rows` / `local_rows`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence, TypeVar

import jax
import numpy as np
from absl import logging

T = TypeVar("T")

_initialized_here = False


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def detect(env: Mapping[str, str] | None = None) -> tuple[str, dict[str, Any]] | None:
    """What the environment asks for: (reason, kwargs for `jax.distributed.initialize`),
    or None for a single process. Pure: reads `env` (default `os.environ`) only."""
    env = os.environ if env is None else env
    coordinator = env.get("RLVER_COORDINATOR")
    num = _env_int(env, "RLVER_NUM_PROCESSES")
    pid = _env_int(env, "RLVER_PROCESS_ID")
    if coordinator or num is not None or pid is not None:
        if not (coordinator and num is not None and pid is not None):
            raise ValueError("set all of RLVER_COORDINATOR, RLVER_NUM_PROCESSES and "
                             "RLVER_PROCESS_ID, or none of them")
        return "RLVER_* environment", dict(coordinator_address=coordinator,
                                           num_processes=num, process_id=pid)
    if env.get("RLVER_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
        return "RLVER_DISTRIBUTED=1 (cluster auto-detection)", {}
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return f"TPU pod slice ({max(len(hosts), 1)} workers)", {}
    slurm_tasks = _env_int(env, "SLURM_STEP_NUM_TASKS") or _env_int(env, "SLURM_NTASKS")
    if env.get("SLURM_JOB_ID") and slurm_tasks and slurm_tasks > 1:
        return f"SLURM ({slurm_tasks} tasks)", {}
    ompi = _env_int(env, "OMPI_COMM_WORLD_SIZE")
    if ompi and ompi > 1:
        return f"Open MPI ({ompi} ranks)", {}
    return None


def is_initialized() -> bool:
    """Whether `jax.distributed.initialize` has run in this process (by us or anyone)."""
    return bool(jax.distributed.is_initialized())


def maybe_initialize(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None,
                     env: Mapping[str, str] | None = None) -> bool:
    """Joins the multi-process job when the arguments or the environment describe one.

    Returns True when this process is (now) part of a multi-process job. Idempotent: a
    second call, or a call after someone else initialised, changes nothing.
    """
    global _initialized_here
    if _initialized_here or is_initialized():
        return jax.process_count() > 1
    if coordinator is not None or num_processes is not None or process_id is not None:
        if coordinator is None or num_processes is None or process_id is None:
            raise ValueError("maybe_initialize: pass coordinator, num_processes and "
                             "process_id together")
        reason, kwargs = "arguments", dict(coordinator_address=coordinator,
                                           num_processes=int(num_processes),
                                           process_id=int(process_id))
    else:
        found = detect(env)
        if found is None:
            logging.info("distributed: single process (no coordinator in the environment)")
            return False
        reason, kwargs = found
    shown = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "auto-detected"
    logging.info("distributed: jax.distributed.initialize(%s) from %s", shown, reason)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        raise RuntimeError(
            f"jax.distributed.initialize failed ({reason}): {e}. It must run before any "
            "other JAX call in the process (devices, arrays, jit).") from e
    _initialized_here = True
    logging.info("distributed: process %d of %d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
    return jax.process_count() > 1


def is_main_process() -> bool:
    """True on process 0: the one that writes logs, metrics and exported files."""
    return jax.process_index() == 0


def host_shard(items: Sequence[T], process_index: int | None = None,
               process_count: int | None = None, *, drop_remainder: bool = False
               ) -> list[T]:
    """This host's share of `items` (e.g. profiles): every `process_count`-th item from
    `process_index`, so shares differ in size by at most one and interleave the source
    order. `drop_remainder` trims every share to the same length, which collective steps
    that stack one equal slice per host need.
    """
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"host_shard: process_index {index} not in [0, {count})")
    share = list(items[index::count])
    if drop_remainder:
        share = share[:len(items) // count]
    return share


def spans_processes(mesh) -> bool:
    """Whether `mesh` holds devices of other processes (then host data must enter and leave
    its arrays through `global_rows` / `local_rows`)."""
    if mesh is None or jax.process_count() == 1:
        return False
    me = jax.process_index()
    return any(d.process_index != me for d in np.asarray(mesh.devices).flat)


def _allgather(local: np.ndarray) -> np.ndarray:
    """[processes, ...]: every process's `local` (same shape and dtype on all)."""
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray(local)))


def max_over_processes(value: int) -> int:
    """The largest `value` any process passed. Every process must call it (a collective)."""
    if jax.process_count() == 1:
        return int(value)
    return int(_allgather(np.asarray(int(value), np.int64)).max())


def any_process(flag: bool) -> bool:
    """True when `flag` is true on some process: the collective form of a loop condition
    (a process with nothing left to do must keep taking part while others still work)."""
    return max_over_processes(int(bool(flag))) == 1


def all_processes(flag: bool) -> bool:
    """True when `flag` is true on every process."""
    return not any_process(not flag)


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable host data: metrics, dialogue records), in process
    order, on every process. A collective; cheap for the small summaries it is meant for."""
    if jax.process_count() == 1:
        return [obj]
    import pickle
    payload = np.frombuffer(pickle.dumps(obj), np.uint8)
    longest = max_over_processes(payload.size)
    padded = np.zeros((longest,), np.uint8)
    padded[:payload.size] = payload
    sizes = _allgather(np.asarray(payload.size, np.int64))
    blobs = _allgather(padded)
    return [pickle.loads(blobs[i, :int(sizes[i])].tobytes()) for i in range(len(sizes))]


def _process_blocks(sharding, global_shape: tuple[int, ...], rows: int) -> bool:
    """Whether every device of `sharding` holds rows of its own process's block only
    (process p's rows are [p * rows, (p + 1) * rows)). A property of the global sharding,
    so every process reaches the same answer without communicating."""
    for device, index in sharding.devices_indices_map(global_shape).items():
        start, stop, _ = index[0].indices(global_shape[0])
        block = device.process_index * rows
        if not (block <= start and stop <= block + rows):
            return False
    return True


def global_rows(local: np.ndarray, mesh, rules: Mapping[str, object] | None = None
                ) -> jax.Array:
    """A global [B, ...] batch from every process's own rows (B = local rows x processes;
    process p's rows become rows [p * local, (p + 1) * local)).

    Multi-host data must enter JAX this way: `jnp.asarray` / `jax.device_put` of a host
    array onto a mesh that spans processes treat the array as the *global* value, so rows
    that differ between hosts (each host's own dialogues) would be silently mixed up.
    Every process must call this with the same local shape. When the batch sharding keeps
    each process's devices inside its own block (the usual data-parallel layout) no data
    crosses hosts; otherwise (e.g. a batch replicated over a tensor axis that spans hosts)
    the rows are all-gathered first.
    """
    from rlver_jax import sharding as shd
    local = np.asarray(local)
    rows = local.shape[0]
    global_shape = (rows * jax.process_count(),) + local.shape[1:]
    sharding = shd.batch_sharding(mesh, local.ndim, rules, batch_size=global_shape[0])
    if _process_blocks(sharding, global_shape, rows):
        # This process's devices cover exactly its own block, in row order: the layout
        # JAX's helper maps the local rows onto.
        return jax.make_array_from_process_local_data(sharding, local, global_shape)
    everything = _allgather(local).reshape(global_shape)
    return jax.make_array_from_callback(global_shape, sharding, lambda index: everything[index])


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global batch (the inverse of `global_rows`): read from its
    own shards when they cover its block, else from a replicated copy, else all-gathered
    (a collective: the choice depends only on the global sharding, so every process
    makes the same one)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    count, me = jax.process_count(), jax.process_index()
    rows = x.shape[0] // count
    lo, hi = me * rows, (me + 1) * rows
    if x.is_fully_replicated:
        return np.asarray(x.addressable_shards[0].data)[lo:hi]
    if _process_blocks(x.sharding, x.shape, rows):
        pieces: dict[int, np.ndarray] = {}
        for shard in x.addressable_shards:
            start, _, _ = shard.index[0].indices(x.shape[0])
            pieces.setdefault(start, np.asarray(shard.data))  # replicas: keep one copy
        # Every row of the block lives on this process's devices (no other holds it).
        return np.concatenate([pieces[k] for k in sorted(pieces)], axis=0)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))[lo:hi]
