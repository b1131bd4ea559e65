"""Training metrics: `WORKDIR/metrics.jsonl`, TensorBoard event files and a progress bar.

Only the main process writes; other processes get a writer that does nothing (or, to
check that hosts agree, one that writes metrics.process<N>.jsonl only).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Mapping

REQUIRED_KEYS = ("step", "reward/mean", "emotion/final_mean", "turns/mean", "tokens/policy",
                 "time/step_s")


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # NaN / inf are not JSON; keep them visible as strings
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl, in order (a torn last line from a crash is skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricWriter:
    """Appends one JSON object per step; mirrors scalars to TensorBoard when enabled."""

    def __init__(self, workdir: str | os.PathLike, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, enabled: bool = True,
                 filename: str = "metrics.jsonl"):
        self.enabled = enabled
        self.path = os.path.join(os.fspath(workdir), filename)
        self.total_steps = total_steps
        self._tb = None
        self._bar = None
        if not enabled:
            return
        os.makedirs(os.fspath(workdir), exist_ok=True)
        if start_step > 0 and os.path.exists(self.path):
            self._truncate_after(start_step)
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(os.fspath(workdir), "tensorboard"),
                                     purge_step=start_step if start_step > 0 else None)
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, file=sys.stderr, mininterval=0)
        self._start_time = time.perf_counter()

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records of steps that the restored checkpoint had not reached, so
        the file reads like one uninterrupted run."""
        kept = [r for r in read_metrics(self.path) if int(r.get("step", -1)) < step]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _json_safe(float(v)) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if math.isfinite(float(value)):
                    self._tb.add_scalar(key, float(value), step)
            self._tb.flush()
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
