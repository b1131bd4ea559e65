"""Every bad input a user can hand the CLIs ends in one line `error: ...` (issue #17).

One test walks the whole list through the commands' entry points: train and evaluate with
bad profiles (truncated, missing key, wrong type, empty, non-UTF-8) and malformed model
directories (no config.json, a missing key, a wrong type, pickle-only weights, a shape
mismatch), bad config values (unknown key, wrong type, bad choice), and export into a
non-empty directory. Starting a CLI process costs seconds (the JAX import), so most cases
call the commands' `main` in this process with stderr captured; a few representative ones
(flag parsing happens at process start) run as real subprocesses.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import tiny
from rlver_jax.env.profiles import SHIPPED
from rlver_jax.models import PRESETS, Qwen2, save_hf
from rlver_jax.tokenizer import ChatTokenizer
from tests.conftest import single_device_env

ROOT = Path(__file__).resolve().parents[1]
TOK = ChatTokenizer.tiny()
CONFIG = PRESETS["tiny"].replace(hidden_size=32, intermediate_size=64, num_heads=4,
                                 num_kv_heads=2, num_layers=1, param_dtype="float32",
                                 dtype="float32", eos_token_id=TOK.im_end_id)


# ------------------------------------------------------------------------- bad inputs
def _good_profile_lines() -> list[str]:
    return SHIPPED["en_eval"].read_text(encoding="utf-8").splitlines()[:2]


def bad_profiles(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (file, what the error must name)."""
    good = _good_profile_lines()
    out = {}

    def write(name, data: bytes, *needles):
        path = root / f"{name}.jsonl"
        path.write_bytes(data)
        out[name] = (path, [str(path), *needles])

    write("truncated", (good[0] + "\n" + good[1][: len(good[1]) // 2]).encode(), "line 2")
    record = json.loads(good[1])
    del record["scene"]
    write("missing_key", (good[0] + "\n" + json.dumps(record)).encode(), "line 2", "scene")
    record = json.loads(good[1])
    record["cha_group"] = 5
    write("wrong_type", (good[0] + "\n" + json.dumps(record)).encode(), "line 2", "cha_group")
    write("empty", b"\n\n")
    write("non_utf8", (good[0] + "\n").encode() + b'{"id": "\xff\xfe"}\n', "line 2")
    return out


def _random_policy():
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2(CONFIG, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


def bad_model_dirs(root: Path) -> dict[str, tuple[Path, list[str]]]:
    """name -> (directory, what the error must name)."""
    good = root / "good"
    save_hf(_random_policy(), CONFIG, good)
    TOK.save_pretrained(good)
    hf = json.loads((good / "config.json").read_text())
    out = {}

    def variant(name, config: dict | None, weights: bool = True, *needles):
        d = root / name
        d.mkdir()
        for f in good.iterdir():
            if f.name != "config.json" and (weights or not f.name.endswith(".safetensors")):
                (d / f.name).write_bytes(f.read_bytes())
        if config is not None:
            (d / "config.json").write_text(json.dumps(config))
        out[name] = (d, [str(d), *needles])

    variant("no_config", None, True, "config.json")
    variant("incomplete_config", {k: v for k, v in hf.items() if k != "vocab_size"}, True,
            "config.json", "vocab_size")
    variant("wrong_type_config", {**hf, "hidden_size": "32"}, True, "config.json",
            "hidden_size")
    variant("pickle_only", hf, False, "safetensors")
    (root / "pickle_only" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    variant("shape_mismatch", {**hf, "intermediate_size": 96}, True, "mlp", "shape")
    return out


# ------------------------------------------------------------------------ the commands
def _one_line_error(rc, stderr: str, needles, what):
    lines = stderr.strip().splitlines()
    assert rc not in (0, None), f"{what}: exit {rc}\n{stderr}"
    assert "Traceback" not in stderr, f"{what}:\n{stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}:\n{stderr}"
    print(f"{what}: {lines[0]}")  # shown with -s
    for needle in needles:
        assert needle in lines[0], f"{what}: {needle!r} not in {lines[0]!r}"


def run_train_in_process(config, workdir) -> tuple[int, str]:
    """`python -m rlver_jax.train` with this config, in process: (exit code, stderr)."""
    from absl import flags
    from rlver_jax import train_cli
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    flags.FLAGS["config"].value = config
    flags.FLAGS["workdir"].value = str(workdir)
    flags.FLAGS["compilation_cache"].value = ""
    err = io.StringIO()
    rc = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            train_cli.main(["rlver_jax.train"])
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def run_main(module_main, *args) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = module_main(list(args))
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


def run_subprocess(*argv) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=single_device_env(),
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


def _train_config(**changes):
    c = tiny.get_config()
    c.total_steps = 1
    c.rollout.batch_dialogues, c.rollout.group_size = 2, 2
    c.mesh.shape = (1, 1, 1)
    c.log.progress = c.log.plots = c.log.tensorboard = False
    for key, value in changes.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def test_every_bad_input_ends_in_one_line_error(tmp_path):
    from rlver_jax import evaluate, export
    profiles = bad_profiles(tmp_path)
    models = bad_model_dirs(tmp_path)
    seen = []

    for name, (path, needles) in profiles.items():
        rc, err = run_train_in_process(_train_config(**{"data.train_profiles": str(path)}),
                                       tmp_path / f"w-{name}")
        _one_line_error(rc, err, needles, f"train, profiles {name}")
        rc, err = run_main(evaluate.main, "evaluate", "--quiet", f"--hf_model={tmp_path / 'good'}", f"--profiles={path}", f"--out={tmp_path / 'o'}")
        _one_line_error(rc, err, needles, f"evaluate, profiles {name}")
        seen.append(f"profiles/{name}")

    for name, (path, needles) in models.items():
        rc, err = run_train_in_process(_train_config(**{"policy.hf_dir": str(path)}),
                                       tmp_path / f"w-{name}")
        _one_line_error(rc, err, needles, f"train, model dir {name}")
        rc, err = run_main(evaluate.main, "evaluate", "--quiet", f"--hf_model={path}",
                           "--profiles=en_eval", f"--out={tmp_path / 'o'}")
        _one_line_error(rc, err, needles, f"evaluate, model dir {name}")
        seen.append(f"model/{name}")

    # Config values checked after parsing: a bad choice, through train and evaluate.
    for key, value in (("rl.algorithm", "ddpg"), ("rollout.truncated_turn", "drop"),
                       ("simulator.difficulty", "nightmare")):
        rc, err = run_train_in_process(_train_config(**{key: value}), tmp_path / "w-choice")
        _one_line_error(rc, err, [f"config.{key}", value], f"train, config {key}={value}")
    for override, needle in (("nope=1", "overrides.nope"), ("start_emotion=high", "start_emotion"),
                             ("reserve=grumpy", "reserve"), ("delta_clamp=-1", "'off'")):
        rc, err = run_main(evaluate.main, "evaluate", "--quiet", f"--hf_model={tmp_path / 'good'}",
                           "--profiles=en_eval", f"--config.simulator.overrides.{override}",
                           f"--out={tmp_path / 'o'}")
        _one_line_error(rc, err, [needle], f"evaluate, override {override}")
    seen += ["config/bad_choice", "config/unknown_key(evaluate)", "config/wrong_type(evaluate)"]

    # Export into a non-empty directory (checked before the workdir is read).
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("keep me")
    rc, err = run_main(export.main, "export", f"--workdir={tmp_path / 'w-any'}", f"--out={taken}")
    _one_line_error(rc, err, [str(taken), "--overwrite"], "export, non-empty out")
    assert (taken / "notes.txt").read_text() == "keep me"
    seen.append("export/non_empty_out")

    # Real processes, for what only happens at process start (the --config.* flags).
    for argv, needles in (
            (["rlver_jax.train", f"--workdir={tmp_path / 'w-sub'}", "--config.rl.nope=1"],
             ["unknown config key --config.rl.nope"]),
            (["rlver_jax.train", f"--workdir={tmp_path / 'w-sub'}", "--config.rl.clip_low=abc"],
             ["--config.rl.clip_low"]),
            (["rlver_jax.plan", "--config=configs/tiny.py", "--config.policy.preset=qwen9"],
             ["config.policy.preset", "qwen9"])):
        rc, err = run_subprocess(*argv)
        _one_line_error(rc, err, needles, " ".join(argv))
    seen += ["config/unknown_key", "config/wrong_type", "plan/bad_choice"]
    assert len(seen) == 5 + 5 + 3 + 1 + 3
