"""The train command end to end as a user runs it: outputs of a default-config run, the
pre-emption signal, and config errors at process start."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rlver_jax.metrics import REQUIRED_KEYS, read_metrics
from tests.conftest import single_device_env
from tests.train_support import ROOT, SMALL, run_cli


def test_cli_end_to_end_writes_metrics_checkpoints_logs_and_plots(tmp_path):
    # As a new user would: the default config and workdir, run outside the checkout. Four
    # held-out dialogues, as many rows as a training rollout: the evaluation reuses the
    # rollout's compiled sampler programs (two dialogues compiled seven more, ~10 s).
    proc = run_cli(None, "--config.total_steps=2", "--config.checkpoint.every=1",
                   "--config.eval.every=2", "--config.eval.max_dialogues=4", cwd=tmp_path)
    workdir = tmp_path / "runs" / "default"    # the default --workdir, under the cwd
    records = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in records] == [0, 1]
    # The held-out evaluation ran after step 1 under the sage protocol (start 40).
    assert "eval/score" not in records[0] and 0 <= records[1]["eval/score"] <= 100
    for r in records:
        assert set(REQUIRED_KEYS) <= set(r)
        assert 0.0 <= r["reward/mean"] <= 1.0
        assert r["reward/mean"] == pytest.approx(r["emotion/final_mean"] / 100, abs=1e-6)
        assert 1 <= r["turns/mean"] <= 8           # the hard preset's turn limit
        assert r["tokens/policy"] > 0 and r["time/step_s"] > 0
        assert r["logprob_gap/max_abs"] < 1e-4      # sampler and trainer agree
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]
    dialogues = [json.loads(line) for line in open(workdir / "dialogues.jsonl")]
    assert {d["step"] for d in dialogues} == {0, 1}
    for d in dialogues:
        assert d["dialogue"] and d["reward"] == pytest.approx(d["final_emotion"] / 100)
    for png in ("training_curves.png", "emotion_first_step.png", "emotion_last_step.png"):
        assert (workdir / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    assert "reward/mean" in proc.stdout

def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
    env = single_device_env()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlver_jax.train", f"--workdir={tmp_path}", *SMALL,
         "--config.total_steps=1000", "--config.checkpoint.every=1000"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and read_metrics(metrics):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "pre-emption" in err
    steps = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints"))
    done = len(read_metrics(metrics))
    assert steps == [done]                  # saved on the signal, not by the schedule
    from rlver_jax.checkpoint import Checkpointer
    checkpointer = Checkpointer(tmp_path / "checkpoints", save_every=1, keep=1)
    assert checkpointer.latest_step() == done
    assert checkpointer.restore_meta(done)["step"] == done
    checkpointer.close()


@pytest.mark.parametrize("args,needle", [
    (["--config.rl.clip_hgh=0.3"], 'did you mean "clip_high"'),
    (["--config.policy.hf_dir=/nonexistent/qwen"], "config.policy.hf_dir"),
    (["--config.rl.algorithm=ddpg"], "config.rl.algorithm"),
    (["--config.policy.attention=flash"], "config.policy.attention='flash'"),
])
def test_bad_config_gives_a_clear_error(tmp_path, args, needle):
    proc = run_cli(tmp_path, "--config.total_steps=1", *args, check=False, timeout=300)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr

