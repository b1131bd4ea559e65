"""PPO through the train command: killed between two checkpoints, it resumes like a straight
run; the policy and the critic export to Hugging Face directories."""

import json

import numpy as np
import pytest

from rlver_jax.metrics import read_metrics
from tests.train_support import assert_same_records, lose_last_checkpoint, run_cli


# Resume of the GRPO default (a second run continues the first exactly like a straight run)
# is tested through a gs:// workdir in tests/test_storage.py; PPO's resume below.


# PPO as configs/tiny.py runs it with one dialogue per profile. top-p < 1 with TIS on: the
# gap alarm compares the trainer with the sampler's untruncated log-probs, ~0 in float32.
PPO = ["--config.rl.algorithm=ppo", "--config.rollout.group_size=1",
       "--config.rollout.batch_dialogues=2", "--config.rollout.top_p=0.7",
       "--config.rl.tis_cap=2.0", "--config.checkpoint.every=1", "--config.log.plots=false",
       "--config.total_steps=3"]


def test_ppo_cli_trains_resumes_after_a_kill_and_exports_policy_and_critic(tmp_path):
    from rlver_jax import export
    run_cli(tmp_path, *PPO)
    straight = read_metrics(tmp_path / "metrics.jsonl")
    for r in straight:
        for key in ("critic/value_loss", "critic/clip_frac", "critic/explained_variance_before",
                    "tis/weight_mean", "tis/capped_frac"):
            assert np.isfinite(r[key]), key
        assert r["logprob_gap/max_abs"] < 1e-4          # like with like despite top-p 0.7
        assert r["tis/weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert r["tis/capped_frac"] == 0.0
        # Whitened over the loss-masked tokens (the PPO default): mean ~0.
        assert abs(r["advantage/mean"]) < 1e-4 and r["update/skipped"] == 0
    # The critic learns something from step to step: its loss is not constant.
    assert len({round(r["critic/value_loss"], 8) for r in straight}) > 1

    lose_last_checkpoint(tmp_path)
    proc = run_cli(tmp_path, *PPO)
    assert "resumed from step 2" in proc.stderr
    assert_same_records(straight, read_metrics(tmp_path / "metrics.jsonl"))

    for kind in ("policy", "critic"):
        out = tmp_path / f"hf_{kind}"
        assert export.main(["export", f"--workdir={tmp_path}", f"--out={out}",
                            f"--model={kind}"]) == 0
        hf = json.loads((out / "config.json").read_text())
        assert hf["dtype"] == "float32"       # the tiny preset's weights came in float32
        assert hf["architectures"] == (["Qwen2ForCausalLM"] if kind == "policy"
                                       else ["Qwen2ForTokenClassification"])
        assert (out / "model.safetensors").stat().st_size > 0
