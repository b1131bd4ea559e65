"""gs:// workdirs against a real GCS API server on localhost (gcp-storage-emulator): train
into gs://, stop and resume from it (matching a straight local run), export from it,
evaluate from it, and read every output back; the append-by-compose path; and an offline
Weights & Biases run."""

import contextlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time

from pathlib import Path

import numpy as np
import pytest

from rlver_jax import storage

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "rlver-test"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A GCS JSON API server on localhost, and the environment that points gcsfs (epath's
    gs:// backend) and tensorstore (Orbax's) at it."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("gcs") / "emulator.log"
    log = open(log_path, "w")  # a file: a full pipe would stall the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.gcs_emulator", str(port), BUCKET], cwd=ROOT,
        stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("localhost", port), 1):
            break
        assert proc.poll() is None and time.time() < deadline, log_path.read_text()
        time.sleep(0.2)
    url = f"http://localhost:{port}"
    env = {"STORAGE_EMULATOR_HOST": url,
           # gcsfs's zonal-bucket probe over gRPC would wait 60 s for the emulator.
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
           "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield f"gs://{BUCKET}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def tfevent_scalars(data: bytes) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of a TFRecord stream of TensorBoard events."""
    from tensorboardX.proto import event_pb2
    out, pos = {}, 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for v in event.summary.value:
            out[(v.tag, event.step)] = v.simple_value
    return out


def wandb_records(path) -> list[bytes]:
    """The records of a W&B run file (`run-*.wandb`): a 7-byte header, then LevelDB-log
    blocks of 32 KiB holding chunks (crc32 4, length 2, type 1: full/first/middle/last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:        # a block's tail too short for a chunk header
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                 # full, last
            records.append(pending)
            pending = b""
    return records


def test_append_composes_onto_the_object(gcs):
    target = storage.join(gcs, "append", "log.jsonl")
    for i in range(3):
        storage.append_text(target, json.dumps({"i": i}) + "\n")
    assert storage.path(target).read_text().splitlines() == [
        '{"i": 0}', '{"i": 1}', '{"i": 2}']
    # the uploaded parts are gone: the directory holds the log only
    assert [p.name for p in storage.path(target).parent.iterdir()] == ["log.jsonl"]


def test_train_resume_export_evaluate_round_trip_through_gs(gcs, tmp_path):
    from rlver_jax import evaluate, export
    from rlver_jax.checkpoint import Checkpointer
    from rlver_jax.metrics import read_metrics
    from rlver_jax.train import train
    from tests.train_support import comparable, small_config

    straight = train(small_config(3), str(tmp_path / "straight")).history
    run = storage.join(gcs, "run")
    config = small_config(2)
    config.log.plots = True
    train(config, run)                         # stops after step 1, checkpoint at 2
    config.total_steps = 3
    resumed = train(config, run)               # a new process would do the same
    tail = resumed.history                     # resumed from gs://
    assert [r["step"] for r in tail] == [2]

    workdir = storage.path(run)
    records = read_metrics(storage.join(run, "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 1, 2]
    # The resumed run reads like the straight one.
    a, b = comparable(straight), comparable(records)
    assert a[2].keys() == b[2].keys()
    for ra, rb in zip(a, b):
        for key in ra:
            np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 3
    dialogues = [json.loads(line) for line in
                 (workdir / "dialogues.jsonl").read_text().splitlines()]
    assert sorted({d["step"] for d in dialogues}) == [0, 1, 2]
    for png in ("training_curves.png", "emotion_first_step.png", "emotion_last_step.png"):
        assert (workdir / "plots" / png).read_bytes()[:8] == PNG_MAGIC
    # One event file per run, written through storage.append_bytes; together they hold
    # the scalars of metrics.jsonl.
    events = sorted((workdir / "tensorboard").iterdir())
    assert len(events) == 2 and all(e.name.startswith("events.out.tfevents") for e in events)
    scalars = {}
    for e in events:
        scalars.update(tfevent_scalars(e.read_bytes()))
    for r in records:
        assert scalars[("reward/mean", r["step"])] == pytest.approx(r["reward/mean"])
    with Checkpointer(storage.join(run, "checkpoints"), read_only=True) as ckpt:
        assert ckpt.latest_step() == 3

    out = storage.join(gcs, "export")
    assert export.main(["rlver_jax.export", f"--workdir={run}", f"--out={out}"]) == 0
    exported = storage.path(out)
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert json.loads((exported / "config.json").read_text())["model_type"] == "qwen2"
    from safetensors.numpy import load as load_safetensors
    weights = load_safetensors((exported / "model.safetensors").read_bytes())
    trained = np.asarray(resumed.states.policy.params["embed"][...])
    np.testing.assert_array_equal(weights["model.embed_tokens.weight"], trained)

    eval_out = storage.join(gcs, "eval")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = evaluate.main(["rlver_jax.evaluate", "--quiet", f"--workdir={run}",
                            "--profiles=en_eval", "--config.max_dialogues=2",
                            "--config.rollout.max_turn_tokens=8",
                            "--config.rollout.max_dialogue_tokens=1024", f"--out={eval_out}"])
    assert rc == 0, err.getvalue()
    report_dir = storage.path(eval_out)
    report = json.loads((report_dir / "report.json").read_text())
    assert report["policy"]["workdir"] == run and report["policy"]["step"] == 3
    lines = (report_dir / "dialogues.jsonl").read_text().splitlines()
    assert len(lines) == report["n"] == 2
    for png in ("emotion_trajectories.png", "score_distribution.png", "need_breakdown.png",
                "personality_breakdown.png"):
        assert (report_dir / png).read_bytes()[:8] == PNG_MAGIC


def test_offline_wandb_run_records_step_metrics_and_config(tmp_path):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2

    from rlver_jax.metrics import MetricWriter

    writer = MetricWriter(tmp_path, total_steps=2, tensorboard=False, progress=False,
                          wandb_project="rlver-test", wandb_mode="offline",
                          run_config={"rl": {"algorithm": "grpo"}, "seed": 7})
    writer.write(0, {"reward/mean": 0.25, "loss": float("nan")})
    writer.write(1, {"reward/mean": 0.5, "loss": 1.0})
    writer.close()
    [run_dir] = [p for p in (tmp_path / "wandb").iterdir() if p.name.startswith("offline-run")]
    [log] = list(run_dir.glob("run-*.wandb"))
    records = []
    deadline = time.time() + 60
    while time.time() < deadline:    # wandb-core may still be writing when finish() returns
        records = [wandb_internal_pb2.Record.FromString(d) for d in wandb_records(log)]
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.2)
    history, config = [], {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in record.history.item})
        elif record.WhichOneof("record_type") in ("run", "config"):
            items = (record.run.config if record.HasField("run") else record.config).update
            config.update({i.key: json.loads(i.value_json) for i in items})
    assert [(h["_step"], h["reward/mean"]) for h in history] == [(0, 0.25), (1, 0.5)]
    assert "loss" not in history[0] and history[1]["loss"] == 1.0   # NaN is not logged
    assert config["seed"] == 7 and config["rl"] == {"algorithm": "grpo"}
