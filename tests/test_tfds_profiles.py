"""The TFDS (array_record) profile dataset: splits, round trip, stable order, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("tensorflow_datasets")

from rlver_jax.env.profiles import SHIPPED, load_profiles  # noqa: E402
from rlver_jax.env.tfds_profiles import (  # noqa: E402
    RlverProfiles,
    ordered_profiles,
    profile_data_source,
    record_to_profile,
)


def test_default_shipped_splits_round_trip(tmp_path):
    train = profile_data_source(tmp_path, "train")
    test = profile_data_source(tmp_path, "test")
    expected_train = load_profiles(SHIPPED["en_train"])
    expected_test = load_profiles(SHIPPED["en_eval"])
    assert len(train) == len(expected_train)
    assert len(test) == len(expected_test)
    assert ordered_profiles(train) == expected_train
    assert ordered_profiles(test) == expected_test
    # Records are shuffled; sorting by id is the other stable order.
    by_id = sorted((record_to_profile(train[i]) for i in range(len(train))), key=lambda p: p.id)
    assert by_id == sorted(expected_train, key=lambda p: p.id)
    rec = train[0]
    assert isinstance(rec["id"], bytes)  # Text features come back as bytes


def test_custom_files_optional_fields_and_reprepare(tmp_path):
    def rec(pid, **kw):
        r = {"id": pid, "player": "玩家", "scene": "场景", "main_cha": "被动型",
             "cha_group": ["内向", "谦逊"], "task": "你希望对方用心倾听你的情绪宣泄"}
        r.update(kw)
        return json.dumps(r, ensure_ascii=False)

    train = tmp_path / "train.jsonl"
    test = tmp_path / "test.jsonl"
    train.write_text("\n".join([rec("a", first_talk="你好", extra_key=[1, 2]), rec("b", topic="")]),
                     encoding="utf-8")
    test.write_text(rec("c", cha_group=[]) + "\n", encoding="utf-8")
    data_dir = tmp_path / "tfds"

    src = profile_data_source(data_dir, "train", train_path=train, test_path=test)
    got = ordered_profiles(src)
    assert got == load_profiles(train)
    assert got[0].first_talk == "你好" and got[0].extra == {"extra_key": [1, 2]}
    assert got[1].first_talk is None and got[1].topic == ""  # "" and None stay distinct
    assert ordered_profiles(
        profile_data_source(data_dir, "test", train_path=train, test_path=test)
    ) == load_profiles(test)

    # Editing a file changes the config, so the dataset is prepared again, not reused.
    train.write_text(rec("z") + "\n", encoding="utf-8")
    src = profile_data_source(data_dir, "train", train_path=train, test_path=test)
    assert [p.id for p in ordered_profiles(src)] == ["z"]


def test_builder_info_and_missing_file(tmp_path):
    builder = RlverProfiles(data_dir=tmp_path)
    assert builder.name == "rlver_profiles"
    assert "cha_group" in builder.info.features
    with pytest.raises(FileNotFoundError):
        RlverProfiles(train_path=Path(tmp_path) / "nope.jsonl", data_dir=tmp_path)
