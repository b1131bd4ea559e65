"""Evaluation CLI: report consistency, the SAGE protocol, plots, workdir input, errors, and
an LLM-simulator smoke run. Tiny random policies, few dialogues, short replies."""

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rlver_jax.checkpoint import Checkpointer
from rlver_jax.env.profiles import SHIPPED, load_profiles
from rlver_jax.evaluate import TOY_WARNING, main
from rlver_jax.models import PRESETS, Qwen2, save_hf
from rlver_jax.tokenizer import ChatTokenizer

TOK = ChatTokenizer.tiny()
# The tiny preset (its vocab is the tiny tokenizer's), narrower still to keep compiles short.
CONFIG = PRESETS["tiny"].replace(hidden_size=32, intermediate_size=64, num_heads=4,
                                 num_kv_heads=2, param_dtype="float32", dtype="float32",
                                 eos_token_id=TOK.im_end_id)
PLOTS = ("emotion_trajectories.png", "score_distribution.png", "need_breakdown.png",
         "personality_breakdown.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_policy(seed):
    """Random weights filled from numpy: `create_model`'s jitted init compiles for tens of
    seconds on a busy 2-core CPU."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2(CONFIG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


def run_cli(*args):
    """(exit code, stdout, stderr) of `python -m rlver_jax.evaluate ARGS`, in process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["rlver_jax.evaluate", "--quiet", *args])
    return rc, out.getvalue(), err.getvalue()


def read_outputs(out_dir):
    report = json.loads((out_dir / "report.json").read_text())
    dialogues = [json.loads(line) for line in
                 (out_dir / "dialogues.jsonl").read_text().splitlines() if line.strip()]
    return report, dialogues


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "hf"
    save_hf(random_policy(0), CONFIG, path)
    TOK.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def rule_eval(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "out"
    rc, stdout, stderr = run_cli(f"--hf_model={hf_dir}", "--profiles=en_eval",
                                 "--config.max_dialogues=4", "--config.rollout.max_turn_tokens=8", f"--out={out}")
    assert rc == 0, stderr
    report, dialogues = read_outputs(out)
    return out, report, dialogues, stdout


def test_report_fields_are_consistent_with_the_dialogues(rule_eval):
    _, report, dialogues, _ = rule_eval
    n = 4
    assert report["n"] == len(dialogues) == n
    finals = [d["final_emotion"] for d in dialogues]
    assert report["score"] == pytest.approx(np.mean(finals))
    assert report["reward_mean"] == pytest.approx(np.mean([min(max(f / 100, 0), 1)
                                                           for f in finals]))
    assert report["success"] == sum(f >= 100 for f in finals)
    assert report["failure"] == sum(f < 10 for f in finals)
    assert report["success_rate"] == pytest.approx(report["success"] / n)
    for table, key in ((report["by_need"], "need"), (report["by_personality"], "personality")):
        assert sum(row["n"] for row in table.values()) == n
        assert sum(row["success"] for row in table.values()) == report["success"]
        assert sum(row["failure"] for row in table.values()) == report["failure"]
        for name, row in table.items():
            mine = [d["final_emotion"] for d in dialogues if d[key] == name]
            assert row["n"] == len(mine)
            assert row["mean_emotion"] == pytest.approx(np.mean(mine))
    turns = [t for d in dialogues for t in d["dialogue"]]
    assert report["replies"] == len(turns)
    assert report["turns_mean"] == pytest.approx(np.mean([d["turns"] for d in dialogues]))
    assert all(1 <= t["tokens"] <= 8 for t in turns)
    # A reply with 8 content tokens had no room for its end-of-turn token: it was cut.
    assert report["truncated_turns"] == sum(t["tokens"] == 8 for t in turns)
    assert report["reply_tokens_mean"] == pytest.approx(np.mean([t["tokens"] for t in turns]))
    assert report["reply_chars_mean"] == pytest.approx(
        np.mean([len(t["policy_reply"]) for t in turns]))
    assert sum(report["end_reasons"].values()) == n
    assert report["end_reasons"] == {
        r: sum(d["done_reason"] == r for d in dialogues) for r in report["end_reasons"]}
    assert report["think"] is False and report["think_format_violations"] == 0
    sim = report["simulator"]
    assert sim["kind"] == "rule" and sim["toy"] is True and sim["warning"] == TOY_WARNING
    assert sim["parse_failures"] == sim["analyzer_fallbacks"] == sim["actor_fallbacks"] == 0
    assert report["policy"]["kind"] == "hf" and report["policy"]["hf_model"].endswith("hf")
    assert report["profiles"]["n"] == n
    timing = report["timing"]
    assert timing["policy_tokens"] == sum(d["policy_tokens"] for d in dialogues) > 0
    assert timing["total_s"] > 0 and timing["policy_tokens_per_s"] > 0


def test_sage_protocol_is_honoured(rule_eval):
    _, report, dialogues, _ = rule_eval
    s = report["settings"]["simulator"]
    assert (s["start_emotion"], s["delta_clamp"], s["max_turns"]) == (40, 10, 10)
    assert s["use_first_talk"] is True
    assert report["settings"]["rollout"]["temperature"] == 0.0
    profiles = {p.id: p for p in load_profiles(SHIPPED["en_eval"])}
    for d in dialogues:
        assert d["opening"] == profiles[d["profile_id"]].first_talk
        assert d["dialogue"][0]["user"] == d["opening"]
        judged = [t for t in d["dialogue"] if "delta" in t]
        assert 1 <= len(judged) == d["turns"] <= 10
        assert judged[0]["emotion_before"] == 40
        for prev, t in zip(judged, judged[1:]):
            assert t["emotion_before"] == prev["emotion_after"]
        for t in judged:
            assert abs(t["delta"]) <= 10
            clamped = max(-10, min(10, t["raw_delta"]))
            assert t["emotion_after"] == max(0, min(100, t["emotion_before"] + clamped))
        assert d["final_emotion"] == judged[-1]["emotion_after"]
    # The toy judge scores a random policy's garble at -20: the clamp must have acted.
    assert any(abs(t["raw_delta"]) > 10 for d in dialogues for t in d["dialogue"])


def test_plots_are_pngs_and_summary_is_printed(rule_eval):
    out, report, _, stdout = rule_eval
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "TOY SIMULATOR" in stdout
    assert "by hidden need" in stdout and "by personality" in stdout
    assert f"{report['score']:.1f}" in stdout
    assert "79.2" in stdout  # the paper's reference line


def test_evaluate_workdir_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    tx = optax.adamw(1e-3)
    meta_model = {**CONFIG.to_hf_dict(), "param_dtype": "float32", "dtype": "float32"}
    train_config = {"rollout": {"think": True, "max_turn_tokens": 6}, "seed": 0}
    with Checkpointer(workdir / "checkpoints", save_every=1, keep=3) as ckpt:
        for step in (1, 3):
            params = nnx.state(random_policy(step), nnx.Param)
            assert ckpt.save(step, {"policy_params": params, "policy_opt": tx.init(params)},
                             {"policy_model": meta_model, "tokenizer": "tiny", "step": step,
                              "config": train_config})
    out = tmp_path / "out"
    rc, _, stderr = run_cli(f"--workdir={workdir}", "--step=1", "--profiles=en_eval",
                            "--config.max_dialogues=2", "--config.batch_size=1", f"--out={out}")
    assert rc == 0, stderr
    report, dialogues = read_outputs(out)
    assert report["policy"] == {"kind": "workdir", "workdir": str(workdir), "step": 1,
                                "tokenizer": "tiny", "dtype": "float32"}
    # think mode and the reply length come from the training config in the checkpoint.
    assert report["think"] is True
    assert report["settings"]["rollout"]["max_turn_tokens"] == 6
    assert report["timing"]["batches"] == 2 and report["settings"]["batch_size"] == 1
    assert [d["index"] for d in dialogues] == [0, 1]
    turns = [t for d in dialogues for t in d["dialogue"]]
    assert all(t["tokens"] is not None and t["tokens"] <= 6 for t in turns)
    assert report["think_format_violations"] == sum(not t["think_closed"] for t in turns)
    assert report["score"] == pytest.approx(np.mean([d["final_emotion"] for d in dialogues]))


@pytest.mark.parametrize("case", ["missing_workdir", "no_checkpoints", "missing_hf",
                                  "empty_profiles", "broken_profiles", "missing_profiles"])
def test_bad_inputs_give_one_line_errors(case, hf_dir, tmp_path):
    profiles = "en_eval"
    source = f"--hf_model={hf_dir}"
    named = None
    if case == "missing_workdir":
        named = str(tmp_path / "nope")
        source = f"--workdir={named}"
    elif case == "no_checkpoints":
        named = str(tmp_path)
        source = f"--workdir={named}"
    elif case == "missing_hf":
        named = str(tmp_path / "no_model")
        source = f"--hf_model={named}"
    elif case == "empty_profiles":
        named = str(tmp_path / "empty.jsonl")
        (tmp_path / "empty.jsonl").write_text("\n")
        profiles = named
    elif case == "broken_profiles":
        good = SHIPPED["en_eval"].read_text().splitlines()[0]
        (tmp_path / "broken.jsonl").write_text(good + "\n{not json\n")
        named = str(tmp_path / "broken.jsonl")
        profiles = named
    elif case == "missing_profiles":
        named = str(tmp_path / "absent.jsonl")
        profiles = named
    rc, stdout, stderr = run_cli(source, f"--profiles={profiles}", f"--out={tmp_path / 'o'}")
    assert rc == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert named in lines[0]
    assert "Traceback" not in stderr + stdout
    if case == "broken_profiles":
        assert "line 2" in lines[0]
    assert not (tmp_path / "o" / "report.json").exists()


def test_llm_simulator_smoke(hf_dir, tmp_path):
    out = tmp_path / "out"
    rc, stdout, stderr = run_cli(
        f"--hf_model={hf_dir}", "--profiles=en_eval", "--config.max_dialogues=2",
        "--config.rollout.max_turn_tokens=4", "--config.simulator.kind=llm",
        "--config.simulator.preset=tiny", "--config.simulator.max_analyzer_tokens=6",
        "--config.simulator.max_actor_tokens=4", "--config.simulator.max_prompt_tokens=512",
        "--config.simulator.overrides.max_turns=2",
        "--config.simulator.overrides.parse_retries=0", f"--out={out}")
    assert rc == 0, stderr
    report, dialogues = read_outputs(out)
    sim = report["simulator"]
    assert sim["kind"] == "llm" and sim["toy"] is False and sim["preset"] == "tiny"
    for key in ("parse_failures", "analyzer_fallbacks", "actor_fallbacks"):
        assert isinstance(sim[key], int) and sim[key] >= 0
    # Random weights almost never write a parsable analysis; each miss is counted.
    assert sim["analyzer_fallbacks"] == sum(not t["parse_ok"] for d in dialogues
                                            for t in d["dialogue"] if "parse_ok" in t)
    timing = report["timing"]
    assert timing["simulator_tokens"] > 0
    # The rollout's KV accounting: every simulator prompt is over the 512-token cap, so
    # each one was cut (truncations), and the policy continued its cache after turn 1.
    assert timing["simulator_prefill_tokens"] > 0 and timing["simulator_reused_tokens"] >= 0
    assert timing["simulator_truncations"] > 0
    assert timing["policy_prefill_tokens"] > 0 and timing["policy_reused_tokens"] > 0
    assert report["settings"]["simulator"]["max_turns"] == 2
    assert report["n"] == 2 and all(d["turns"] <= 2 for d in dialogues)
    assert "TOY" not in stdout


def test_llm_simulator_from_an_hf_directory(hf_dir, tmp_path):
    """The simulator of `config.simulator.hf_dir` loads as training loads it (rlver_jax.build),
    in the dtype it was saved in, reading with the directory's own tokenizer."""
    out = tmp_path / "out"
    rc, _, stderr = run_cli(
        f"--hf_model={hf_dir}", "--profiles=en_eval", "--config.max_dialogues=1",
        "--config.rollout.max_turn_tokens=4", f"--config.simulator.hf_dir={hf_dir}",
        "--config.simulator.max_analyzer_tokens=4", "--config.simulator.max_actor_tokens=4",
        "--config.simulator.max_prompt_tokens=256", "--config.simulator.overrides.max_turns=1",
        "--config.simulator.overrides.parse_retries=0", f"--out={out}")
    assert rc == 0, stderr
    report, dialogues = read_outputs(out)
    sim = report["simulator"]
    assert sim["kind"] == "llm" and sim["hf_dir"] == str(hf_dir) and sim["toy"] is False
    assert sim["tokenizer"] == str(hf_dir) and sim["sampling"]["max_prompt_tokens"] == 256
    assert report["timing"]["simulator_tokens"] > 0 and len(dialogues) == 1
