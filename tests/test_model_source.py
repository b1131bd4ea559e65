"""Hub ids as model sources, from a Hugging Face cache the test lays out itself
(models--ORG--NAME/snapshots/REV/..., refs/main) with HF_HUB_OFFLINE=1: no network."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlver_jax.model_source import ModelSourceError, parse_hub_id, resolve_model_dir
from rlver_jax.tokenizer import ChatTokenizer, load_chat_tokenizer

ROOT = Path(__file__).resolve().parents[1]
REPO = "tiny-org/tiny-qwen"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory):
    """A hub cache holding REPO at REVISION (refs/main points at it): the tiny tokenizer and
    a model config (loading weights from a directory is tested in test_model_parity)."""
    from tests.test_evaluate import CONFIG

    cache = tmp_path_factory.mktemp("hf") / "hub"
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / REVISION
    ChatTokenizer.tiny().save_pretrained(snapshot)
    (snapshot / "config.json").write_text(json.dumps(CONFIG.to_hf_dict()))
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)
    return cache, snapshot


@pytest.fixture
def offline_cache(hub_cache, monkeypatch):
    """huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported (conftest
    sets HF_HUB_OFFLINE=1 before that); point its cache constant at the test's cache."""
    from huggingface_hub import constants
    assert constants.HF_HUB_OFFLINE
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache[0]))
    return hub_cache


def test_hub_ids_are_told_from_paths(tmp_path):
    assert parse_hub_id("Qwen/Qwen2.5-7B-Instruct") == ("Qwen/Qwen2.5-7B-Instruct", None)
    assert parse_hub_id("Qwen/Qwen2.5-7B-Instruct@v1.0") == ("Qwen/Qwen2.5-7B-Instruct",
                                                             "v1.0")
    for path in ("/abs/dir", "./rel/dir", "~/models/q", "a/b/c", "qwen2.5", ""):
        assert parse_hub_id(path) is None, path
    (tmp_path / "org" / "name").mkdir(parents=True)
    os.chdir(tmp_path)
    try:
        assert parse_hub_id("org/name") is None     # an existing directory wins
    finally:
        os.chdir(ROOT)


def test_hub_id_resolves_from_the_cache_and_loads(offline_cache):
    from rlver_jax.models.config import Qwen2Config
    _, snapshot = offline_cache
    assert resolve_model_dir(REPO) == str(snapshot)
    assert resolve_model_dir(f"{REPO}@{REVISION}") == str(snapshot)
    config = Qwen2Config.from_json_file(os.path.join(resolve_model_dir(REPO), "config.json"))
    assert config.hidden_size == 32
    tok = load_chat_tokenizer(REPO)
    assert tok.spec == REPO                         # what a checkpoint records
    from_dir = load_chat_tokenizer(str(snapshot))
    assert tok.vocab_size == from_dir.vocab_size == ChatTokenizer.tiny().vocab_size
    assert tok.encode("hello there") == from_dir.encode("hello there")


def test_env_picks_the_cache_in_a_new_process(hub_cache, tmp_path):
    """HF_HOME (its hub/ subfolder) selects the cache when HF_HUB_CACHE is unset."""
    cache, snapshot = hub_cache
    home = tmp_path / "hf_home"
    shutil.copytree(cache, home / "hub", symlinks=True)
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", "from rlver_jax.model_source import resolve_model_dir; "
         f"print(resolve_model_dir({REPO!r}))"],
        env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == str(home / "hub" / snapshot.relative_to(cache))


def test_uncached_hub_id_offline_is_a_one_line_error(offline_cache, tmp_path):
    with pytest.raises(ModelSourceError) as e:
        resolve_model_dir("nobody/missing", what="config.policy.hf_dir")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("config.policy.hf_dir: hub model nobody/missing is not in")
    assert "HF_HUB_OFFLINE" in message and "hf download nobody/missing" in message
    with pytest.raises(ModelSourceError, match="at revision v9"):
        resolve_model_dir(f"{REPO}@v9")             # cached repo, uncached revision

    # The trainer accepts a hub id in its config and fails on it with the same line.
    from rlver_jax.config_checks import ConfigError, validate_config
    from rlver_jax.train import train
    from tests.train_support import small_config
    c = small_config(1)
    c.policy.hf_dir = "nobody/missing"
    validate_config(c)
    with pytest.raises(ConfigError, match="^config.policy.hf_dir: hub model nobody/missing"):
        train(c, str(tmp_path / "w"))
    c.policy.hf_dir = "/nonexistent/qwen"
    with pytest.raises(ConfigError, match="model directory not found: /nonexistent/qwen"):
        validate_config(c)

    # evaluate: --hf_model and config.simulator.hf_dir
    from tests.test_evaluate import run_cli
    for flag in ("--hf_model=nobody/missing", f"--hf_model={REPO}"):
        extra = [] if "missing" in flag else ["--config.simulator.hf_dir=nobody/missing"]
        rc, _, err = run_cli(flag, *extra, "--profiles=en_eval", f"--out={tmp_path / 'e'}")
        assert rc == 1
        [line] = err.strip().splitlines()
        assert "hub model nobody/missing is not in the Hugging Face cache" in line
