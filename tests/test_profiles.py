"""Profile loading, validation errors, classification helpers and the shipped sets."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import pytest

from rlver_jax.env.profiles import (
    HIDDEN_NEEDS,
    PERSONALITIES,
    SHIPPED,
    Profile,
    ProfileError,
    hidden_need_category,
    load_profiles,
    personality,
    profile_language,
    profiles_path,
    write_profiles,
)

# The released RLVER files sit next to the repository: <root>/../shared/data/rlver.
RELEASED = Path(__file__).resolve().parents[2] / "shared" / "data" / "rlver"
TRAIN = RELEASED / "train_profile.jsonl"
TEST = RELEASED / "test_profile.jsonl"

needs_released = pytest.mark.skipif(
    not (TRAIN.is_file() and TEST.is_file()),
    reason=f"released RLVER profiles not found under {RELEASED}",
)


def _record(pid: str = "p1", **overrides) -> dict:
    rec = {
        "id": pid,
        "player": "* Name: Test",
        "scene": "## Backstory\n...",
        "main_cha": "negative",
        "cha_group": ["suspicious", "blunt", "proud"],
        "task": "practical advice: you want advice.",
    }
    rec.update(overrides)
    return rec


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- released files --------------------------------------------------------------------


@pytest.fixture(scope="module")
def released() -> tuple[list[Profile], list[Profile]]:
    if not (TRAIN.is_file() and TEST.is_file()):
        pytest.skip(f"released RLVER profiles not found under {RELEASED}")
    return load_profiles(TRAIN), load_profiles(TEST)


@needs_released
def test_released_counts_and_fields(released):
    train, test = released
    assert len(train) == 500
    assert len(test) == 100
    first = train[0]
    assert first.id == "6186ad54-5996-4b91-9402-6a5e4c2ae9ad"
    assert first.player.startswith("* 姓名：王丽娜")
    assert first.main_cha in {"负面型", "被动型", "回避型"}
    assert isinstance(first.cha_group, tuple) and len(first.cha_group) == 3
    assert first.first_talk is None and first.topic is None and first.extra == {}
    assert all(p.first_talk for p in test)  # SAGE test profiles carry a fixed first message
    assert test[0].first_talk == "最近有些事搞得我头大，张浩那个态度，真让我摸不着头脑。"
    assert "隐藏主题" in first.scene
    assert len({p.id for p in train + test}) == 600


@needs_released
def test_released_helpers(released):
    train, test = released
    cats = [hidden_need_category(p) for p in train + test]
    mapped = sum(c in HIDDEN_NEEDS for c in cats)
    assert mapped / len(cats) >= 0.95
    assert set(cats) >= set(HIDDEN_NEEDS)  # every need occurs in the released data
    counts = collections.Counter(personality(p) for p in train)
    assert counts == {"negative": 183, "passive": 174, "avoidant": 143}
    assert {profile_language(p) for p in train + test} == {"zh"}


@needs_released
def test_released_round_trip(released, tmp_path):
    _, test = released
    out = tmp_path / "copy.jsonl"
    write_profiles(test, out)
    assert load_profiles(out) == test


# --- broken files ----------------------------------------------------------------------


def test_malformed_json_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [
        json.dumps(_record("a")), json.dumps(_record("b")), '{"id": "c", "player": ',
    ])
    with pytest.raises(ProfileError) as e:
        load_profiles(path)
    msg = str(e.value)
    assert "bad.jsonl" in msg and "line 3" in msg and "malformed JSON" in msg
    assert e.value.line == 3
    assert isinstance(e.value, ValueError)


def test_missing_key_names_key_and_line(tmp_path):
    rec = _record("b")
    del rec["task"]
    path = _write(tmp_path / "missing.jsonl", [json.dumps(_record("a")), json.dumps(rec)])
    with pytest.raises(ProfileError, match=r"missing\.jsonl, line 2: missing required key 'task'"):
        load_profiles(path)


@pytest.mark.parametrize("key,value", [
    ("player", 42), ("cha_group", {"a": 1}), ("cha_group", ["ok", 3]), ("id", None),
    ("first_talk", ["hi"]), ("main_cha", ""),
])
def test_wrong_type_names_key(tmp_path, key, value):
    path = _write(tmp_path / "types.jsonl", [json.dumps(_record("a", **{key: value}))])
    with pytest.raises(ProfileError) as e:
        load_profiles(path)
    assert f"'{key}'" in str(e.value) and "line 1" in str(e.value)
    assert e.value.key == key


def test_not_an_object(tmp_path):
    path = _write(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(ProfileError, match="line 1: expected a JSON object"):
        load_profiles(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ProfileError, match=r"empty\.jsonl: no profiles"):
        load_profiles(path)


def test_duplicate_ids_name_both_lines(tmp_path):
    path = _write(tmp_path / "dup.jsonl", [
        json.dumps(_record("x")), "", json.dumps(_record("y")), json.dumps(_record("x")),
    ])
    with pytest.raises(ProfileError) as e:
        load_profiles(path)
    msg = str(e.value)
    assert "dup.jsonl" in msg and "line 4" in msg and "line 1" in msg and "'x'" in msg


def test_blank_lines_optional_keys_and_extra(tmp_path):
    path = _write(tmp_path / "ok.jsonl", [
        "",
        json.dumps(_record(7, first_talk="hi", topic=None, source="sage")),
        "   ",
        json.dumps(_record("b", cha_group="多疑、愤怒、自私")),
    ])
    a, b = load_profiles(path)
    assert a.id == "7" and a.first_talk == "hi" and a.topic is None
    assert a.extra == {"source": "sage"} and a.to_dict()["source"] == "sage"
    assert b.cha_group == ("多疑", "愤怒", "自私")
    hash(a)  # frozen and hashable despite the dict field
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.id = "z"  # type: ignore[misc]


def test_bad_utf8_names_line(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(json.dumps(_record("a")).encode() + b"\n\xff\xfe\n")
    with pytest.raises(ProfileError, match="line 2: not valid UTF-8"):
        load_profiles(path)


# --- helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw,expected", [
    ("负面型", "negative"), ("被动型", "passive"), ("回避型", "avoidant"),
    ("Negative", "negative"), ("avoidant type", "avoidant"), ("passive", "passive"),
])
def test_personality(raw, expected):
    assert personality(raw) == expected


def test_personality_unknown():
    with pytest.raises(ValueError, match="unknown personality"):
        personality("cheerful")


@pytest.mark.parametrize("task,need", [
    ("你希望对方用心倾听你的情绪宣泄", "being listened to while venting"),
    ("practical advice: anything", "practical advice"),
    ("Others’ motives", "others' motives"),
    ("I want someone to praise what I did", "sincere praise of specific actions"),
    ("我觉得我没有错", "being told they did nothing wrong"),
    ("sell me a car", "other"),
])
def test_hidden_need_category_text(task, need):
    assert hidden_need_category(task) == need


# --- shipped sets ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> dict[str, list[Profile]]:
    return {name: load_profiles(path) for name, path in SHIPPED.items()}


def test_shipped_files_exist_and_load(shipped):
    assert set(shipped) == {"en_train", "en_eval", "zh_train", "zh_eval"}
    all_ids = [p.id for ps in shipped.values() for p in ps]
    assert len(all_ids) == len(set(all_ids))
    for name, ps in shipped.items():
        lang = name.split("_")[0]
        assert {profile_language(p) for p in ps} == {lang}, name
        for p in ps:
            assert len(p.cha_group) == 3 and p.topic, p.id


@pytest.mark.parametrize("name,min_total,per_need,per_personality", [
    ("en_train", 64, 8, 16),
    ("en_eval", 16, 2, 4),
    ("zh_train", 16, 2, 5),
    ("zh_eval", 8, 1, 2),
])
def test_shipped_coverage(shipped, name, min_total, per_need, per_personality):
    ps = shipped[name]
    assert len(ps) >= min_total
    needs = collections.Counter(hidden_need_category(p) for p in ps)
    pers = collections.Counter(personality(p) for p in ps)
    assert set(needs) == set(HIDDEN_NEEDS), needs
    assert min(needs.values()) >= per_need, needs
    assert set(pers) == set(PERSONALITIES), pers
    assert min(pers.values()) >= per_personality, pers
    if name.endswith("_eval"):
        assert all(p.first_talk and p.first_talk.strip() for p in ps)


def test_shipped_english_tasks_start_with_need(shipped):
    for p in shipped["en_train"] + shipped["en_eval"]:
        assert p.task.split(":")[0] in HIDDEN_NEEDS, p.id
        assert p.main_cha in PERSONALITIES
        # The scene ends with the hidden theme, as in the released files.
        assert p.scene.rsplit("***", 1)[1] in p.task


def test_profiles_path_resolves_shipped_names_and_files(tmp_path):
    assert profiles_path("en_eval") == str(SHIPPED["en_eval"])
    own = tmp_path / "mine.jsonl"
    own.write_text("")
    assert profiles_path(own) == str(own)
    with pytest.raises(FileNotFoundError, match=r"'en_evl': no such file, and not a shipped "
                                                r"set \(en_eval, en_train, zh_eval, zh_train\)"):
        profiles_path("en_evl")
    with pytest.raises(FileNotFoundError, match="not a shipped set"):
        profiles_path(tmp_path)  # a directory is not a profiles file
