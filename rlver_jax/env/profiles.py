"""User profiles for the simulated user: loading RLVER / SAGE jsonl and classifying them.

A profile describes the person the user simulator role-plays: a persona card (`player`), a
backstory with reaction rules ending in the hidden theme (`scene`), a personality type
(`main_cha`) with three traits (`cha_group`), and the hidden need (`task`) the policy has to
discover. One JSON object per line:

    {"id": ..., "player": ..., "scene": ..., "main_cha": ..., "cha_group": [...],
     "task": ..., "first_talk": ... (optional), "topic": ... (optional)}

The released RLVER files (500 training, 100 SAGE test profiles) are Chinese and are read by
path; the package ships its own English and Chinese sets, listed in `SHIPPED`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CJK_RE",
    "HIDDEN_NEEDS",
    "OTHER_NEED",
    "PERSONALITIES",
    "Profile",
    "ProfileError",
    "SHIPPED",
    "hidden_need_category",
    "load_profiles",
    "personality",
    "profile_from_dict",
    "profile_language",
    "write_profiles",
]

# The eight hidden needs of RLVER, by canonical English name. The order follows the paper.
HIDDEN_NEEDS: tuple[str, ...] = (
    "dialectical analysis",
    "practical advice",
    "others' motives",
    "guided self-reflection",
    "sincere praise of specific actions",
    "being listened to while venting",
    "deep empathy rather than platitudes",
    "being told they did nothing wrong",
)
OTHER_NEED = "other"

PERSONALITIES: tuple[str, ...] = ("negative", "passive", "avoidant")

_DATA_DIR = Path(__file__).resolve().parent / "data"
# Profile sets written for this project (not translations of the released RLVER files).
SHIPPED: dict[str, Path] = {
    name: _DATA_DIR / f"{name}.jsonl" for name in ("en_train", "en_eval", "zh_train", "zh_eval")
}

REQUIRED_KEYS: tuple[str, ...] = ("id", "player", "scene", "main_cha", "cha_group", "task")
OPTIONAL_KEYS: tuple[str, ...] = ("first_talk", "topic")


class ProfileError(ValueError):
    """A profile file or record is invalid. `path`, `line` (1-based) and `key` say where."""

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str] | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.line = line
        self.key = key
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


@dataclasses.dataclass(frozen=True)
class Profile:
    """One simulated user.

    `cha_group` is a tuple (the files hold a JSON list) so that profiles stay immutable.
    `first_talk` and `topic` are None when the file does not give them. Keys that are not
    part of the schema are kept in `extra` (written back by `to_dict`) so that SAGE variants
    with additional fields survive a load / write round trip.
    """

    id: str
    player: str
    scene: str
    main_cha: str
    cha_group: tuple[str, ...]
    task: str
    first_talk: str | None = None
    topic: str | None = None
    # Excluded from the hash: dicts are unhashable and `id` already identifies a profile.
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        """The jsonl record: required keys, the optional ones that are set, then `extra`."""
        out: dict[str, Any] = {
            "id": self.id,
            "player": self.player,
            "scene": self.scene,
            "main_cha": self.main_cha,
            "cha_group": list(self.cha_group),
            "task": self.task,
        }
        if self.first_talk is not None:
            out["first_talk"] = self.first_talk
        if self.topic is not None:
            out["topic"] = self.topic
        out.update(self.extra)
        return out


def _split_traits(text: str) -> tuple[str, ...]:
    # Some SAGE variants write the traits as one string ("多疑、愤怒、自私").
    parts = re.split(r"[,，、;；/|]+|\s{2,}", text)
    return tuple(p.strip() for p in parts if p.strip())


def profile_from_dict(
    record: Mapping[str, Any],
    *,
    path: str | os.PathLike[str] | None = None,
    line: int | None = None,
) -> Profile:
    """Validates one decoded record and builds a `Profile`.

    Raises `ProfileError` naming `path`, `line` and the offending key. `id` may be a JSON
    string or integer (normalised to str); `cha_group` a list of strings or one string of
    traits separated by commas / 、; `first_talk` and `topic` may be absent or null.
    """

    def fail(message: str, key: str | None = None) -> ProfileError:
        return ProfileError(message, path=path, line=line, key=key)

    if not isinstance(record, Mapping):
        raise fail(f"expected a JSON object, got {type(record).__name__}")
    for key in REQUIRED_KEYS:
        if key not in record:
            raise fail(f"missing required key {key!r}", key)

    raw_id = record["id"]
    # bool is an int subclass; an id of `true` is certainly a mistake.
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise fail(f"key 'id' must be a string or integer, got {type(raw_id).__name__}", "id")
    pid = str(raw_id).strip()
    if not pid:
        raise fail("key 'id' is empty", "id")

    fields: dict[str, str] = {}
    for key in ("player", "scene", "main_cha", "task"):
        value = record[key]
        if not isinstance(value, str):
            raise fail(f"key {key!r} must be a string, got {type(value).__name__}", key)
        fields[key] = value
    if not fields["main_cha"].strip():
        raise fail("key 'main_cha' is empty", "main_cha")

    raw_group = record["cha_group"]
    if isinstance(raw_group, str):
        cha_group = _split_traits(raw_group)
    elif isinstance(raw_group, (list, tuple)):
        bad = [type(x).__name__ for x in raw_group if not isinstance(x, str)]
        if bad:
            raise fail(f"key 'cha_group' must hold strings, found {bad[0]}", "cha_group")
        cha_group = tuple(x.strip() for x in raw_group)
    else:
        raise fail(
            f"key 'cha_group' must be a list of strings, got {type(raw_group).__name__}",
            "cha_group",
        )

    optional: dict[str, str | None] = {}
    for key in OPTIONAL_KEYS:
        value = record.get(key)
        if value is not None and not isinstance(value, str):
            raise fail(f"key {key!r} must be a string or null, got {type(value).__name__}", key)
        optional[key] = value

    extra = {k: v for k, v in record.items() if k not in REQUIRED_KEYS + OPTIONAL_KEYS}
    return Profile(
        id=pid,
        player=fields["player"],
        scene=fields["scene"],
        main_cha=fields["main_cha"],
        cha_group=cha_group,
        task=fields["task"],
        first_talk=optional["first_talk"],
        topic=optional["topic"],
        extra=extra,
    )


def profiles_path(spec: str | os.PathLike[str]) -> str:
    """The file behind a profile spec: a shipped set's name (`en_train`, ...) or a path.
    Raises FileNotFoundError naming the spec and the shipped sets."""
    path = os.fspath(SHIPPED.get(os.fspath(spec), spec))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"profiles {os.fspath(spec)!r}: no such file, and not a "
                                f"shipped set ({', '.join(sorted(SHIPPED))})")
    return path


def load_profiles(path: str | os.PathLike[str]) -> list[Profile]:
    """Reads a profile jsonl file (RLVER / SAGE schema) in file order.

    Blank lines are skipped. A malformed line, a missing key or a wrong type, an empty file
    and duplicate ids raise `ProfileError`, whose message names the file and the 1-based
    line number (and the key where one is at fault). A missing file raises
    FileNotFoundError.
    """
    path = Path(path)
    data = path.read_bytes()
    profiles: list[Profile] = []
    first_line_of: dict[str, int] = {}
    # Decode line by line so that an encoding error is reported with its line number.
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM from some editors
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ProfileError(f"not valid UTF-8 ({e.reason})", path=path, line=lineno) from e
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(
                f"malformed JSON ({e.msg} at column {e.colno})", path=path, line=lineno
            ) from e
        profile = profile_from_dict(record, path=path, line=lineno)
        if profile.id in first_line_of:
            raise ProfileError(
                f"duplicate id {profile.id!r} (first at line {first_line_of[profile.id]})",
                path=path,
                line=lineno,
                key="id",
            )
        first_line_of[profile.id] = lineno
        profiles.append(profile)
    if not profiles:
        raise ProfileError("no profiles: the file is empty or holds only blank lines", path=path)
    return profiles


def write_profiles(profiles: Iterable[Profile], path: str | os.PathLike[str]) -> None:
    """Writes profiles as UTF-8 jsonl (non-ASCII kept readable), one per line."""
    with open(path, "w", encoding="utf-8") as f:
        for p in profiles:
            f.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")


# --- hidden need -----------------------------------------------------------------------

# The released Chinese files use exactly these eight `task` sentences (checked on all 600).
_ZH_TASKS: dict[str, str] = {
    "你希望对方辩证地分析事件中的问题": "dialectical analysis",
    "你想获得能真实帮助你解决当下困境的建议": "practical advice",
    "你想分析事件中其他人物这么做的原因": "others' motives",
    "你希望对方引导你针对事件进行自我反思，收获自我成长": "guided self-reflection",
    "你希望对方真诚地夸奖你在事件中的具体行为": "sincere praise of specific actions",
    "你希望对方用心倾听你的情绪宣泄": "being listened to while venting",
    "你希望对方深刻共情你的感受，而不是简单的安慰": "deep empathy rather than platitudes",
    "你认为自己在事件中没有任何责任和错误，你想要对方也认同你没有错": (
        "being told they did nothing wrong"
    ),
}

# Keyword rules for paraphrased tasks, most specific first: "did nothing wrong" and
# "praise" sentences often also mention listening or feelings, and "advice" appears in
# negations ("not advice, just listen"), so it is tried last.
_KEYWORD_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("being told they did nothing wrong", (
        "没有错", "没错", "没有任何责任", "不是我的错", "nothing wrong", "not my fault",
        "not at fault", "did no wrong", "blameless", "wasn't wrong", "was not wrong",
    )),
    ("sincere praise of specific actions", (
        "夸奖", "表扬", "称赞", "赞美", "肯定你", "praise", "compliment", "recognition",
    )),
    ("others' motives", (
        "其他人物", "他人", "别人", "对方为什么", "这么做的原因", "动机", "motive",
        "why they", "why he", "why she", "why others", "other people's reasons",
        "the other people", "acted the way", "their reasons",
    )),
    ("dialectical analysis", (
        "辩证", "客观分析", "两面", "dialectic", "both sides", "balanced analysis",
        "weigh the",
    )),
    ("guided self-reflection", (
        "自我反思", "反思", "自我成长", "self-reflection", "reflect", "self reflection",
        "grow from",
    )),
    ("being listened to while venting", (
        "倾听", "宣泄", "发泄", "倾诉", "listen", "vent",
    )),
    ("deep empathy rather than platitudes", (
        "共情", "感同身受", "理解你的感受", "简单的安慰", "empath", "platitude",
        "truly understand", "feel what you feel", "easy comfort", "simple comfort",
    )),
    ("practical advice", (
        "建议", "办法", "解决", "advice", "practical", "solution", "what to do",
    )),
)


def hidden_need_category(profile: Profile | str) -> str:
    """Maps the free-text `task` to one of `HIDDEN_NEEDS`, or "other".

    Accepts a profile or the task text. Tried in order: the exact released Chinese
    sentences; a task that starts with a canonical English name (the shipped sets write
    "practical advice: ..."); keyword rules in Chinese and English.
    """
    task = profile.task if isinstance(profile, Profile) else profile
    text = task.strip().lstrip("*#").strip()
    if text in _ZH_TASKS:
        return _ZH_TASKS[text]
    lowered = text.lower().replace("\u2019", "'")
    for need in HIDDEN_NEEDS:
        if lowered.startswith(need):
            return need
    for need, keywords in _KEYWORD_RULES:
        if any(k in lowered for k in keywords):
            return need
    return OTHER_NEED


# --- personality -------------------------------------------------------------------------

_PERSONALITY_ALIASES: dict[str, str] = {
    "负面型": "negative", "负面": "negative", "消极型": "negative",
    "被动型": "passive", "被动": "passive",
    "回避型": "avoidant", "回避": "avoidant",
    "negative": "negative", "passive": "passive", "avoidant": "avoidant",
}


def personality(profile: Profile | str) -> str:
    """Normalises `main_cha` (负面型/被动型/回避型 or English) to negative/passive/avoidant.

    Raises ValueError for a value that is none of the three types.
    """
    raw = profile.main_cha if isinstance(profile, Profile) else profile
    key = raw.strip().lower()
    key = re.sub(r"[\s_-]*(type|personality)$", "", key)
    if key in _PERSONALITY_ALIASES:
        return _PERSONALITY_ALIASES[key]
    who = f" of profile {profile.id!r}" if isinstance(profile, Profile) else ""
    raise ValueError(
        f"unknown personality type {raw!r}{who}; expected one of {PERSONALITIES} "
        "or 负面型/被动型/回避型"
    )


# --- language ----------------------------------------------------------------------------

# CJK ideographs (the unified blocks and the compatibility block): what makes text Chinese.
CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")


def profile_language(profile: Profile) -> str:
    """"zh" when the persona and scene are mostly Chinese, else "en".

    Counts CJK ideographs against Latin letters; one ideograph carries about as much as a
    short English word, so a 1:4 ratio already means Chinese text with English names in it.
    """
    text = profile.player + profile.scene
    cjk = len(CJK_RE.findall(text))
    latin = len(_LATIN.findall(text))
    return "zh" if cjk * 4 >= latin and cjk > 0 else "en"
