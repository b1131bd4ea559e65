"""Two JAX processes on this machine (CPU collectives over localhost) train and checkpoint
on one global mesh; both must agree on losses and on the restored parameters."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from rlver_jax import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = float(os.environ.get("RLVER_MULTIHOST_TIMEOUT", "150"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_processes(commands: list[list[str]], cwd: str, env: dict, timeout: float):
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for cmd in commands]
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0][-3000:] for p in procs]
        pytest.fail(f"processes did not finish in {timeout:.0f} s:\n" + "\n----\n".join(logs))
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"process failed (rc {p.returncode}):\n{out[-5000:]}"
    return outputs


def test_two_processes_train_and_checkpoint(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(HERE))
    worker = os.path.join(HERE, "multihost_worker.py")
    _run_processes([[sys.executable, worker, str(i), "2", str(port), str(tmp_path)]
                    for i in range(2)], cwd=str(tmp_path), env=env, timeout=TIMEOUT_S)
    results = [json.loads((tmp_path / f"result_{i}.json").read_text()) for i in range(2)]
    a, b = results
    assert [r["process_index"] for r in results] == [0, 1]
    assert a["is_main"] and not b["is_main"]
    assert a["process_count"] == b["process_count"] == 2
    assert a["losses"] == b["losses"] and len(a["losses"]) == 3
    assert all(x == x for x in a["losses"])  # finite, not NaN
    assert a["param_sums"] == b["param_sums"]
    assert a["restored_sums"] == a["param_sums"] == b["restored_sums"]
    assert a["restored_equal"] and b["restored_equal"]
    assert a["restored_sharding_ok"] and b["restored_sharding_ok"]
    assert a["restored_step"] == b["restored_step"] == 3
    assert a["profiles"] == [0, 2, 4, 6, 8] and b["profiles"] == [1, 3, 5, 7, 9]
    # Each process's rows land in the global batch and come back unchanged.
    expected_sum = 2 * sum(range(6)) + 100 * 6
    for r in results:
        assert r["rows"] == {"global_shape": [4, 3], "global_sum": expected_sum,
                             "local_back": True}


def test_detect_reads_the_environment():
    assert distributed.detect({}) is None
    reason, kwargs = distributed.detect({"RLVER_COORDINATOR": "h0:1234",
                                         "RLVER_NUM_PROCESSES": "4",
                                         "RLVER_PROCESS_ID": "3"})
    assert kwargs == dict(coordinator_address="h0:1234", num_processes=4, process_id=3)
    with pytest.raises(ValueError, match="all of"):
        distributed.detect({"RLVER_COORDINATOR": "h0:1234"})
    assert distributed.detect({"RLVER_DISTRIBUTED": "1"})[1] == {}
    assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b,c,d"})[0].startswith("TPU")
    assert distributed.detect({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert distributed.detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8"})[0].startswith("SLURM")
    assert distributed.detect({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert distributed.detect({"OMPI_COMM_WORLD_SIZE": "2"})[0].startswith("Open MPI")


def test_single_process_and_host_shard():
    assert distributed.maybe_initialize(env={}) is False
    assert distributed.is_main_process()
    items = list(range(7))
    shares = [distributed.host_shard(items, i, 3) for i in range(3)]
    assert sorted(sum(shares, [])) == items
    assert [len(s) for s in shares] == [3, 2, 2]
    assert [len(distributed.host_shard(items, i, 3, drop_remainder=True))
            for i in range(3)] == [2, 2, 2]
    assert distributed.host_shard(items) == items  # one process: everything
    with pytest.raises(ValueError):
        distributed.host_shard(items, 3, 3)
