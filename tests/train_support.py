"""What the train tests share: the small CI config (in process and as CLI flags), the train
command as a subprocess, and record comparisons for resume tests. The tests are split over
files (tests/test_train*.py) so that pytest-xdist's per-file scheduling can run the slow
ones on both workers."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from configs import tiny
from tests.conftest import single_device_env

ROOT = Path(__file__).resolve().parents[1]
# Small enough for CI: 2 profiles x 2 dialogues, short replies.
SMALL = ["--config.rollout.batch_dialogues=4", "--config.rollout.group_size=2",
         "--config.rollout.max_turn_tokens=8", "--config.log.progress=false"]
# Keys that depend on wall time, not on the computation.
TIMING_PREFIXES = ("time/", "throughput/")


def small_config(total_steps: int):
    c = tiny.get_config()
    c.total_steps = total_steps
    c.rollout.batch_dialogues = 4
    c.rollout.group_size = 2
    c.rollout.max_turn_tokens = 8
    c.checkpoint.every = 1
    c.mesh.shape = (1, 1, 1)
    c.log.progress = False
    c.log.plots = False
    return c


def run_cli(workdir, *args, timeout=600, check=True, cwd=ROOT):
    """`python -m rlver_jax.train` in `cwd`; `workdir=None` leaves the default."""
    env = single_device_env()
    workdir_flag = [] if workdir is None else [f"--workdir={workdir}"]
    proc = subprocess.run(
        [sys.executable, "-m", "rlver_jax.train", *workdir_flag, *SMALL, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def comparable(records):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIXES)} for r in records]


def lose_last_checkpoint(workdir) -> None:
    """What a kill between two checkpoints leaves: the last checkpoint never written (the
    metrics written after it are dropped on resume)."""
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    shutil.rmtree(workdir / "checkpoints" / str(steps[-1]))


def assert_same_records(a, b):
    a, b = comparable(a), comparable(b)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key in ra:
            np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-6, err_msg=key)

