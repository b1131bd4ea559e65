"""Configs from any directory: shipped names resolve, the `configs` package is installed with
the project, and a user's own config file builds on the shipped ones. (The train command run
from a temporary directory is tests/test_train_cli.py's end-to-end test.)"""

import configparser
import os
from pathlib import Path

import setuptools

from rlver_jax import config_files

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_names_resolve_outside_the_checkout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = os.path.join(config_files.SHIPPED_DIR, "rlver.py")
    assert config_files.resolve_config_arg("rlver") == shipped
    assert config_files.resolve_config_arg("rlver.py:think") == shipped + ":think"
    assert config_files.resolve_config_arg("configs/rlver.py:think") == shipped + ":think"
    assert config_files.resolve_config_argv(
        ["train", "--config", "tiny", "--config.seed=1"]) == [
        "train", "--config", os.path.join(config_files.SHIPPED_DIR, "tiny.py"),
        "--config.seed=1"]
    # A file that exists here wins over a shipped one of the same name.
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rlver.py").write_text("")
    assert config_files.resolve_config_arg("configs/rlver.py") == "configs/rlver.py"
    # Unknown names are left for ml_collections to report.
    assert config_files.resolve_config_arg("nope.py") == "nope.py"


def test_configs_package_ships_with_the_project():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    include = cfg["options.packages.find"]["include"].split()
    packages = setuptools.find_packages(where=str(ROOT), include=include)
    assert {"rlver_jax", "configs"} <= set(packages)
    assert os.path.isfile(config_files.DEFAULT_CONFIG)


def test_a_user_config_builds_on_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text(
        "from configs import tiny\n\n\ndef get_config():\n"
        "    c = tiny.get_config()\n    c.total_steps = 7\n    return c\n")
    from ml_collections.config_flags.config_flags import _LoadConfigModule
    module = _LoadConfigModule("mine", config_files.resolve_config_arg("mine.py"))
    assert module.get_config().total_steps == 7


def test_a_missing_config_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = config_files.resolve_config_argv(["train", "--config=nope.py:x", "--config.seed=1"])
    message = config_files.missing_config_error(argv)
    assert message == ("error: --config=nope.py:x: no such config file (pass a path or a "
                       "shipped config: base, eval, rlver, tiny, tiny_llm)")
    assert config_files.missing_config_error(
        config_files.resolve_config_argv(["train", "--config", "rlver:ppo"])) is None
    assert config_files.missing_config_error(["train"]) is None     # the default
