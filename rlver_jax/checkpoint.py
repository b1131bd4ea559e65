"""Training checkpoints (Orbax) and pre-emption handling.

A checkpoint is one directory per step under `directory` (`directory/<step>/`), written by
`orbax.checkpoint.CheckpointManager`. Each step holds named array *items* (pytrees saved
with `StandardSave`: `nnx.State`s, optax states, ...) and one JSON item, `meta` (configs,
tokenizer spec, seeds, data cursor).

Crash safety: Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it into
place only when every item is complete (plus a commit marker), so a crash during a save
leaves the previous steps intact; `latest_step()` never reports a half-written step, and a
writable `Checkpointer` removes leftover temporary directories when it opens.

Async saves: `save` returns once the arrays have been copied off the device; the files are
written in a background thread. Donating or overwriting the saved arrays afterwards is
therefore safe. `restore`, `wait` and `close` first wait for the write in flight; a
process must call `wait()` (or `close()`) before it exits, or the last save is lost (the
previous one stays valid).

Pre-emption: `PreemptionGuard` turns SIGTERM / SIGINT into a flag; the training loop asks
`guard.should_stop(step)` once per step, then saves with `force=True`, calls `close()` and
exits. A save already in flight when the signal arrives simply completes.

Multi-host: Orbax saves and restores collectively. Every process must call `save`,
`restore` and `wait` with the same arguments, in the same order (each process writes its
own shards, process 0 writes the metadata and commits); nothing else is needed.
`PreemptionGuard.should_stop` is also collective in multi-process runs, so that all
processes stop, and save, at the same step.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

log = logging.getLogger(__name__)

META_ITEM = "meta"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the requested targets."""


# ------------------------------------------------------------------------------ helpers
def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """`jax.ShapeDtypeStruct`s (with shardings) for a tree of arrays: a restore target.

    `shardings` is None (keep each leaf's own `.sharding`, when it has one), one sharding
    for every leaf, or a tree of shardings whose structure is a prefix of `tree`'s (e.g.
    `sharding.param_shardings(state, mesh)` for an `nnx.State`).
    """
    def one(x, s=None):
        sharding = s if s is not None else getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    if shardings is None:
        return jax.tree.map(one, tree)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda x: one(x, shardings), tree)
    # The sharding tree may stop above the array leaves (`param_shardings` puts one
    # sharding where `tree` has an `nnx.Variable` holding the array): map over it as a prefix.
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: one(x, s), sub), shardings, tree)


def _key_name(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def _default_sharding(targets: Any) -> jax.sharding.Sharding:
    """Replicated over the mesh that the targets' sharded leaves use, else the first local
    device: the placement of target leaves that carry no sharding."""
    for leaf in jax.tree.leaves(targets):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    return SingleDeviceSharding(jax.local_devices()[0])


def _fill_shardings(target: Any, default: jax.sharding.Sharding) -> Any:
    """Gives every leaf of a restore target a sharding (`default` where it has none).

    Left unset, Orbax would place a leaf by the *saved* topology, which may not exist in
    this run (e.g. a step counter from `jax.eval_shape` after a resume on another mesh).
    """
    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                    sharding=sharding if sharding is not None else default)
    return jax.tree.map(one, target)


def _is_remote(directory: str) -> bool:
    return "://" in directory


# ---------------------------------------------------------------------------- Checkpointer
class Checkpointer:
    """Saves and restores named pytrees plus JSON metadata, one directory per step.

    Args:
      directory: where the step directories live (created unless `read_only`).
      save_every: `save(step, ...)` writes when `step % save_every == 0` (Orbax's
        fixed-interval policy), at a pre-emption sync point, or with `force`.
      keep: how many of the most recent steps to keep (0: all).
      async_save: write in a background thread (see the module docstring).
      read_only: never write or delete anything (export and evaluation read a workdir
        that a trainer may be writing to; they must not remove its in-flight temporary
        directories).
    """

    def __init__(self, directory: str | os.PathLike, save_every: int = 1, keep: int = 0,
                 async_save: bool = True, read_only: bool = False):
        directory = os.fspath(directory)
        if not _is_remote(directory):
            directory = os.path.abspath(directory)
        if save_every < 1:
            raise ValueError(f"save_every={save_every}: must be >= 1")
        if keep < 0:
            raise ValueError(f"keep={keep}: must be >= 0 (0 keeps every checkpoint)")
        self.directory = directory
        self.save_every = int(save_every)
        self.keep = int(keep)
        self.read_only = read_only
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only or keep == 0 else keep,
            # Orbax decides when to save: every `save_every` steps, and (multi-host) at the
            # step JAX's pre-emption service agrees on. Not its default policy, which also
            # saves the first step of a run whatever the interval.
            save_decision_policy=None if read_only else ocp.checkpoint_managers.AnySavePolicy([
                ocp.checkpoint_managers.FixedIntervalPolicy(self.save_every),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]),
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
        )
        self._mngr = ocp.CheckpointManager(directory, options=options)

    # -------------------------------------------------------------------------- steps
    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint (plus one being written asynchronously)."""
        if self.read_only:
            # Another process (the trainer) may have written new steps since we opened.
            self._mngr.reload()
        return sorted(int(s) for s in self._mngr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def resolve_step(self, step: int | None) -> int:
        """`step`, checked to have a checkpoint; None: the latest (after pending saves)."""
        self.wait()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; available steps: {steps}")
        return int(step)

    def _step_dir(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step)

    def items_at(self, step: int | None = None) -> list[str]:
        """Names of the array items saved at `step` (default: the latest)."""
        step = self.resolve_step(step)
        step_dir = self._step_dir(step)
        return sorted(p.name for p in step_dir.iterdir()
                      if p.is_dir() and p.name != META_ITEM and not p.name.startswith("."))

    # --------------------------------------------------------------------------- save
    def save(self, step: int, items: Mapping[str, Any], meta: Mapping[str, Any],
             force: bool = False) -> bool:
        """Saves `items` (name -> pytree of arrays) and `meta` (JSON) as step `step`.

        Writes when `step % save_every == 0`, at a multi-host pre-emption sync point, or
        with `force`; without `force`, a step at or below the latest saved one is skipped.
        A step that already has a checkpoint is never rewritten (returns False), so a
        forced save at pre-emption right after a periodic save of the same step is a no-op.
        Returns whether a save was started. Every process must call it, at every step
        (multi-host: the pre-emption sync point is agreed collectively).
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; cannot save")
        step = int(step)
        if not force and not self._mngr.should_save(step):
            return False
        if step in self._mngr.all_steps():
            log.info("checkpoint for step %d already exists in %s", step, self.directory)
            return False
        if META_ITEM in items:
            raise ValueError(f"item name {META_ITEM!r} is reserved for the JSON metadata")
        if not items:
            raise ValueError("save needs at least one item")
        try:
            # Checked here: Orbax would fail later, inside its background thread.
            meta = json.loads(json.dumps(dict(meta)))
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint meta for step {step} is not JSON-serialisable: {e}"
                            ) from e
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        args[META_ITEM] = ocp.args.JsonSave(meta)
        # The decision is made above (Orbax's policy or `force`); asking Orbax again would
        # query the pre-emption sync point twice for one step.
        saved = self._mngr.save(step, args=ocp.args.Composite(**args), force=True)
        if saved:
            log.info("saving checkpoint step %d to %s (%s)", step, self.directory,
                     ", ".join(sorted(items)))
        return bool(saved)

    # ------------------------------------------------------------------------ restore
    def restore(self, step: int | None = None, targets: Mapping[str, Any] | None = None,
                items: Sequence[str] | None = None) -> tuple[int, dict[str, Any], dict]:
        """Restores `items` (default: every item in `targets`) of `step` (default: latest).

        `targets` maps item name -> a tree of `jax.ShapeDtypeStruct` (or arrays) with the
        saved tree structure; each leaf lands with the target's dtype and sharding (a
        restore onto a mesh arrives sharded; see `abstract_like`). Leaves without a
        sharding are replicated over the mesh of the other targets (or put on the first
        local device when no target is on a mesh). Returns (step, {item: tree}, meta).
        """
        targets = dict(targets or {})
        names = list(targets) if items is None else list(items)
        if not names:
            raise ValueError("restore needs at least one item (pass targets)")
        step = self.resolve_step(step)
        available = self.items_at(step)
        for name in names:
            if name not in available:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} has no item {name!r}; "
                    f"it has {available}")
            if name not in targets:
                raise ValueError(f"no restore target given for item {name!r}")
        args = {}
        default = _default_sharding([targets[name] for name in names])
        for name in names:
            target = _fill_shardings(targets[name], default)
            self._check_target(step, name, target)
            args[name] = ocp.args.StandardRestore(target)
        args[META_ITEM] = ocp.args.JsonRestore()
        restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
        return step, {name: restored[name] for name in names}, dict(restored[META_ITEM] or {})

    def _check_target(self, step: int, name: str, target: Any) -> None:
        """Compares a target with the saved tree; errors name the item and the key."""
        item_dir = self._step_dir(step) / name
        try:
            saved = ocp.StandardCheckpointHandler().metadata(item_dir).tree
        except Exception as e:  # noqa: BLE001 - unreadable metadata: let restore report it
            log.warning("could not read metadata of %s: %s", item_dir, e)
            return
        saved_flat = ocp.tree.to_flat_dict(saved)
        target_flat = ocp.tree.to_flat_dict(target)
        missing = sorted(_key_name(k) for k in set(target_flat) - set(saved_flat))
        extra = sorted(_key_name(k) for k in set(saved_flat) - set(target_flat))
        if missing or extra:
            raise CheckpointError(
                f"item {name!r} of checkpoint step {step} in {self.directory} does not match "
                f"the target tree: keys only in the target: {missing[:10]}; keys only in the "
                f"checkpoint: {extra[:10]}")
        for key, want in target_flat.items():
            have = tuple(getattr(saved_flat[key], "shape", ()) or ())
            if tuple(np.shape(want)) != have:
                raise CheckpointError(
                    f"item {name!r} key {_key_name(key)!r} of checkpoint step {step} in "
                    f"{self.directory}: saved shape {have}, target shape {tuple(np.shape(want))}")

    def restore_meta(self, step: int | None = None) -> dict:
        """The JSON metadata of `step` (default: the latest)."""
        step = self.resolve_step(step)
        restored = self._mngr.restore(step, args=ocp.args.Composite(
            **{META_ITEM: ocp.args.JsonRestore()}))
        return dict(restored[META_ITEM] or {})

    # --------------------------------------------------------------------- lifecycle
    def wait(self) -> None:
        """Blocks until an asynchronous save in flight is on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases Orbax's threads."""
        self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Checkpointer({self.directory!r}, save_every={self.save_every}, "
                f"keep={self.keep}, read_only={self.read_only})")


# -------------------------------------------------------------------------- pre-emption
class PreemptionGuard:
    """Turns SIGTERM / SIGINT into a flag so the training loop can save and exit cleanly.

    Usage::

        with PreemptionGuard() as guard:
            for step in ...:
                ...
                if guard.should_stop(step):
                    checkpointer.save(step, items, meta, force=True)
                    break
        checkpointer.close()

    A second signal of the same kind runs the previous handler (Ctrl-C twice still
    interrupts a hung save). Handlers can only be installed from the main thread; elsewhere
    the guard is inert (and says so in the log). The previous handlers are restored on exit.

    Multi-host: a signal may reach only some processes, and every process must save at
    the same step, so `should_stop` is collective there: it all-gathers the local flags
    and also asks JAX's pre-emption sync service (`reached_preemption_sync_point`), which
    handles SIGTERM itself when `jax.distributed` runs it; SIGTERM is then left to JAX.
    Every process must call `should_stop` at every step.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal_received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested and signum == self.signal_received:
            previous = self._previous.get(signum, signal.SIG_DFL)
            if callable(previous):
                return previous(signum, frame)
            if previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
            return None
        self.requested = True
        self.signal_received = signum
        log.warning("received %s: will save a checkpoint and stop at the end of this step",
                    signal.Signals(signum).name)
        return None

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            log.warning("PreemptionGuard outside the main thread: signals are not intercepted")
            return self
        for signum in self.signals:
            if signum == signal.SIGTERM and _jax_preemption_service_active():
                continue
            self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step`; the same answer on every process."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        from rlver_jax.distributed import any_process
        stop = any_process(self.requested)
        try:
            stop = stop or bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # the pre-emption service is disabled
            pass
        return stop


def _jax_preemption_service_active() -> bool:
    # `jax.distributed.initialize` starts the service (which takes over SIGTERM) whenever
    # this flag is on.
    return bool(jax.distributed.is_initialized()
                and jax.config.jax_enable_preemption_service)
