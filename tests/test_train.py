"""The train function in process: config errors, non-finite updates. The train command's
tests are tests/test_train_cli.py (outputs, pre-emption, errors at process start),
tests/test_train_resume.py (kill and resume, export) and tests/test_train_default_run.py
(the default command's recorded metrics)."""

import os

import pytest

from rlver_jax.metrics import read_metrics
from rlver_jax.config_checks import ConfigError
from rlver_jax.train import train
from tests.train_support import small_config


@pytest.mark.parametrize("key,value,needle", [
    ("policy.param_dtype", "float8", "config.policy.param_dtype"),
    ("rl.tis_cap", -1.0, "config.rl.tis_cap"),
])
def test_bad_numerics_values_name_the_key(key, value, needle):
    from rlver_jax.config_checks import validate_config
    c = small_config(1)
    section, field = key.split(".")
    c[section][field] = value
    with pytest.raises(ConfigError, match=needle):
        validate_config(c)


def test_empty_profile_file_names_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    c = small_config(1)
    c.data.train_profiles = str(empty)
    with pytest.raises(ValueError, match="empty.jsonl"):
        train(c, str(tmp_path / "w"))
    c.data.train_profiles = "no_such_set"
    with pytest.raises(ConfigError, match="no_such_set"):
        train(c, str(tmp_path / "w"))


def test_repeated_non_finite_updates_stop_the_run_and_keep_the_last_checkpoint(
        tmp_path, monkeypatch):
    from rlver_jax import step as stages
    from rlver_jax.train import TrainingError
    make_advantages = stages.make_advantages

    def poisoned_factory(*args, **kwargs):
        advantages = make_advantages(*args, **kwargs)
        calls = []

        def poisoned(arrays, scores):
            batch, metrics = advantages(arrays, scores)
            # From the second step on every advantage is NaN: the loss is NaN, updates skip.
            if calls:
                batch = batch.replace(advantages=batch.advantages * float("nan"))
            calls.append(1)
            return batch, metrics
        return poisoned

    monkeypatch.setattr(stages, "make_advantages", poisoned_factory)
    with pytest.raises(TrainingError, match=r"3 consecutive steps.*last good checkpoint \(step 1\)"):
        train(small_config(6), str(tmp_path))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["update/skipped"] for r in records] == [0.0, 1.0, 1.0]
    # Skipped steps wrote no checkpoint: the last one holds the last good parameters.
    assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [1]
