"""Two JAX processes on this machine (CPU collectives over localhost) train and checkpoint
on one global mesh; both must agree on losses and on the restored parameters. The train
command itself runs as two processes, resumes from its multi-host checkpoint, and a single
process exports that checkpoint."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from rlver_jax import distributed
from rlver_jax.metrics import read_metrics
from tests.conftest import FAST_COMPILE_FLAGS, single_device_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
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
    # Each process's rows land in its block of the global batch and come back unchanged,
    # whichever way the batch is sharded.
    for r in results:
        for layout in ("process_blocks", "replicated", "fsdp_only"):
            assert r["rows"][layout] == {"global_shape": [4, 3],
                                         "global_rows": [0, 3, 100, 103],
                                         "local_back": True}, layout
        assert r["rows"]["agree"] == [6, True, False]
        assert r["rows"]["gathered"] == [{"p": 0, "x": ""}, {"p": 1, "x": "y"}]


def _train_env(process_id: int, port: int) -> dict:
    """One process of a two-process job with 2 fake CPU devices each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLVER_")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE_FLAGS}",
               RLVER_COORDINATOR=f"localhost:{port}", RLVER_NUM_PROCESSES="2",
               RLVER_PROCESS_ID=str(process_id))
    return env


def _train_two_processes(workdir, total_steps: int, args: list[str] | None = None
                         ) -> list[str]:
    # By default: GRPO (group advantages computed per host) in think mode, where each host
    # has its own number of training rows per step, which the processes must agree on.
    # Mesh (data 2 across the hosts, fsdp 2 within each); 8 dialogues in groups of 2 =
    # 4 per host; evaluation over 3 profiles (2 + 1).
    args = args or [
            "--config.rollout.think=True", "--config.rollout.batch_dialogues=8",
            "--config.rollout.group_size=2", "--config.rollout.max_turn_tokens=8",
            "--config.simulator.overrides.max_turns=2", "--config.mesh.shape=(2,2,1)",
            "--config.checkpoint.every=1", "--config.eval.every=2",
            "--config.eval.max_dialogues=3", "--config.log.every_process=True",
            "--config.log.progress=False", "--config.log.tensorboard=False",
            "--config.log.plots=False"]
    args = [sys.executable, "-m", "rlver_jax.train", f"--workdir={workdir}", *args,
            f"--config.total_steps={total_steps}"]  # after a --config=FILE among args
    port = _free_port()
    procs = [subprocess.Popen(args, cwd=ROOT, env=_train_env(i, port), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for i in range(2)]
    deadline = time.monotonic() + 2 * TIMEOUT_S
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0][-3000:] for p in procs]
        pytest.fail("train processes did not finish:\n" + "\n----\n".join(logs))
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"train process failed (rc {p.returncode}):\n{out[-5000:]}"
    return outputs


# Per-host wall time and the compile counter differ between processes by nature.
LOCAL_PREFIXES = ("time/", "throughput/", "compile/")


def test_two_processes_run_the_train_command_resume_and_export(tmp_path):
    workdir = tmp_path / "run"
    _train_two_processes(workdir, total_steps=2)
    outputs = _train_two_processes(workdir, total_steps=3)  # resumes from step 2
    assert "resumed from step 2" in outputs[0]

    main, other = _shared_metrics(workdir)
    assert [r["step"] for r in main] == [0, 1, 2]
    assert main == other
    for a in main:
        # Reduced over both hosts' dialogues (4 each), not one host's.
        assert a["dialogues"] == 8
        assert 0.0 <= a["reward/mean"] <= 1.0 and np.isfinite(a["policy/loss"])
        assert a["update/skipped"] == 0.0
    assert main[1]["eval/score"] == other[1]["eval/score"] and "eval/score" not in main[0]
    assert not (workdir / "tensorboard").exists()
    logged = [json.loads(line) for line in (workdir / "dialogues.jsonl").read_text().splitlines()]
    assert {d["step"] for d in logged} == {0, 1, 2}
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 3]

    # One process exports what two wrote; the weights are the ones the run trained.
    out = tmp_path / "hf"
    env = {k: v for k, v in single_device_env().items() if not k.startswith("RLVER_")}
    proc = subprocess.run([sys.executable, "-m", "rlver_jax.export", f"--workdir={workdir}",
                           f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from rlver_jax.models.safetensors_io import SafetensorsFile
    squares = 0.0
    for path in sorted(out.glob("*.safetensors")):
        f = SafetensorsFile(path)
        squares += sum(float(np.sum(np.asarray(f[k], np.float64) ** 2)) for k in f.keys())
    np.testing.assert_allclose(np.sqrt(squares), main[-1]["policy/param_norm"], rtol=1e-5)


def _shared_metrics(workdir) -> list[list[dict]]:
    """Per process, its metrics without the keys that are local by nature."""
    files = [workdir / "metrics.jsonl", workdir / "metrics.process1.jsonl"]
    return [[{k: v for k, v in r.items() if not k.startswith(LOCAL_PREFIXES)}
             for r in read_metrics(f)] for f in files]


@pytest.mark.skipif(os.environ.get("RLVER_SLOW_TESTS") != "1",
                    reason="2-3 min on two cores; set RLVER_SLOW_TESTS=1")
def test_two_processes_with_the_llm_simulator_agree(tmp_path):
    """The simulator LLM in lock step: hosts re-sample unparsable analyzer outputs for
    different rows and numbers of rounds, yet must make the same simulator calls."""
    _train_two_processes(tmp_path, 2, [
        "--config=configs/tiny_llm.py", "--config.simulator.overrides.max_turns=2",
        "--config.mesh.shape=(-1,1,1)", "--config.log.every_process=True",
        "--config.log.progress=False", "--config.log.tensorboard=False",
        "--config.log.plots=False"])
    main, other = _shared_metrics(tmp_path)
    assert main == other and len(main) == 2
    assert all(r["dialogues"] == 4 and r["tokens/simulator"] > 0 for r in main)


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


def test_process_layout_errors_name_the_key():
    from configs import tiny
    from rlver_jax.config_checks import ConfigError, validate_process_layout
    c = tiny.get_config()  # 16 dialogues in groups of 4: 4 profiles per step
    validate_process_layout(c, 1, False)
    validate_process_layout(c, 4, True)
    with pytest.raises(ConfigError, match=r"config\.rollout\.batch_dialogues: .*4 profiles "
                                          r"per step, which 3 processes"):
        validate_process_layout(c, 3, True)
    with pytest.raises(ConfigError, match=r"config\.mesh\.shape: .*one process only.*2 "
                                          r"processes"):
        validate_process_layout(c, 2, False)
