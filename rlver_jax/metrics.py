"""Training metrics: `WORKDIR/metrics.jsonl`, TensorBoard event files, an optional Weights &
Biases run and a progress bar. Files go through `rlver_jax.storage` (local or gs://).

Only the main process writes; other processes get a writer that does nothing (or, to
check that hosts agree, one that writes metrics.process<N>.jsonl only).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

from rlver_jax import storage

REQUIRED_KEYS = ("step", "reward/mean", "emotion/final_mean", "turns/mean", "tokens/policy",
                 "time/step_s")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN / inf are not JSON; keep them visible as strings
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl, in order (a torn last line from a crash is skipped)."""
    records = []
    with storage.path(path).open("r") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


WANDB_MODES = ("online", "offline")


class TrackerError(RuntimeError):
    """An experiment tracker cannot start as configured; the message names the key."""


def start_wandb(project: str, mode: str, workdir: str | os.PathLike,
                run_config: Mapping[str, Any] | None, start_step: int = 0):
    """A W&B run (the optional `wandb` extra) named after the workdir; its local files go to
    WORKDIR/wandb, or to ./wandb when the workdir is remote (W&B writes local files only).
    A resumed training is a new W&B run whose steps start at `start_step`."""
    if mode not in WANDB_MODES:
        raise TrackerError(f"config.log.wandb_mode: {mode!r} is not one of {WANDB_MODES}")
    try:
        import wandb
    except ImportError as e:
        raise TrackerError("config.log.wandb_project is set but wandb is not installed: "
                          "pip install 'rlver_jax[wandb]'") from e
    workdir = os.fspath(workdir)
    local_dir = "." if storage.is_remote(workdir) else workdir
    name = workdir.rstrip("/").rsplit("/", 1)[-1]
    os.makedirs(local_dir, exist_ok=True)
    return wandb.init(project=project, mode=mode, dir=local_dir, name=name,
                      config=dict(run_config or {}),
                      notes=f"workdir {workdir}, from step {start_step}",
                      settings=wandb.Settings(silent=True), reinit="create_new")


class MetricWriter:
    """Appends one JSON object per step; mirrors scalars to TensorBoard and W&B when
    enabled."""

    def __init__(self, workdir: str | os.PathLike, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, enabled: bool = True,
                 filename: str = "metrics.jsonl", wandb_project: str = "",
                 wandb_mode: str = "online", run_config: Mapping[str, Any] | None = None):
        self.enabled = enabled
        self.path = storage.join(workdir, filename)
        self.total_steps = total_steps
        self._tb = None
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        storage.makedirs(workdir)
        if start_step > 0 and storage.path(self.path).exists():
            self._truncate_after(start_step)
        if tensorboard:
            from tensorboardX import SummaryWriter
            logdir = storage.join(workdir, "tensorboard")
            storage.register_tensorboard_scheme(logdir)
            self._tb = SummaryWriter(logdir, purge_step=start_step if start_step > 0 else None)
        if wandb_project:
            self._wandb = start_wandb(wandb_project, wandb_mode, workdir, run_config,
                                      start_step)
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, file=sys.stderr, mininterval=0)
        self._start_time = time.perf_counter()

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records of steps that the restored checkpoint had not reached, so
        the file reads like one uninterrupted run."""
        kept = [r for r in read_metrics(self.path) if int(r.get("step", -1)) < step]
        storage.replace_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _json_safe(float(v)) for k, v in metrics.items()}}
        storage.append_text(self.path, json.dumps(record) + "\n")
        finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
        if self._tb is not None:
            for key, value in finite.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(finite, step=int(step))
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"reward {metrics.get('reward/mean', float('nan')):.3f} "
                f"emotion {metrics.get('emotion/final_mean', float('nan')):.1f} "
                f"tok/s {metrics.get('throughput/tokens_per_s', float('nan')):.0f}",
                refresh=False)
            self._bar.update(1)

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
