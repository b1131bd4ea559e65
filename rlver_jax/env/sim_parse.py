"""Parsing the simulator's output: the analyzer's emotion change and the actor's reply.

Every parser here never raises: a garbled generation gives a result with `ok` False, and the
caller retries or falls back (`emotion.decide_retry`). Labels are matched in English and
Chinese, with the decorations models put around them (markdown, numbering, brackets).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from rlver_jax.env.sim_settings import DEFAULT_GOODBYE_WORDS

__all__ = [
    "ACTOR_FIELDS",
    "ANALYZER_FIELDS",
    "MAX_PARSED_ABS_DELTA",
    "ActorResult",
    "AnalyzerResult",
    "analysis_fields",
    "as_text",
    "contains_goodbye",
    "parse_actor",
    "parse_analyzer",
]

# A parsed emotion change larger than this is not a change but a misread number (a year,
# the emotion itself): treated as a parse failure.
MAX_PARSED_ABS_DELTA = 100

# "再见到他" / "再见面" mean "see him again" / "meet again", not goodbye.
_GOODBYE_NOT_FOLLOWED_BY: dict[str, str] = {"再见": "(?![到面过着])"}

ANALYZER_FIELDS: tuple[str, ...] = ("intent", "fit", "reaction", "feeling", "delta")
ACTOR_FIELDS: tuple[str, ...] = ("thinking", "draft", "refine", "reply")

# Label aliases per field (EN and ZH, lower case, after NFKC). Longer aliases first so that
# regex alternation prefers them.
_ANALYZER_ALIASES: dict[str, tuple[str, ...]] = {
    "intent": ("what the friend meant", "what my friend meant", "intention", "intent", "meaning",
               "对方的意图", "对方意图", "意图", "用意"),
    "fit": ("fit with the hidden need", "fit with my need", "need fit", "fit", "match",
            "契合度", "贴合度", "匹配度", "契合", "贴合"),
    "reaction": ("inner reaction", "internal reaction", "reaction", "内心反应", "内心活动",
                 "心理活动", "内心想法", "反应"),
    "feeling": ("feelings", "feeling", "情绪感受", "感受", "感觉"),
    "delta": ("emotion change", "emotional change", "change in emotion", "emotion delta",
              "mood change", "emotion score change", "score change", "delta", "change",
              "情绪变化值", "情绪值变化", "情绪分变化", "情绪变化", "情绪变动", "变化值", "变化"),
    # Words for the CURRENT value (the Chinese prompt's own 情绪值 among them): recognised as
    # labels only so that such a line ends the change field and is never read as a change.
    "current": ("current emotion value", "current emotion score", "current emotion",
                "new emotion value", "new emotion score", "new emotion", "emotion value",
                "emotion score", "emotion now", "current score", "current value", "emotion",
                "当前情绪值", "当前情绪分", "当前情绪", "现在的情绪值", "目前情绪值", "最新情绪值",
                "情绪值", "情绪分", "当前分数", "当前分值"),
}
# Fields that are labels only: not part of AnalyzerResult.fields, never shown to the actor.
_LABEL_ONLY_FIELDS = ("current",)
_ACTOR_ALIASES: dict[str, tuple[str, ...]] = {
    "thinking": ("thinking", "thoughts", "thought", "内心思考", "思考", "想法"),
    "draft": ("first draft", "draft reply", "draft", "回复草稿", "初稿", "草稿"),
    "refine": ("how to make it more realistic", "make it more realistic", "make it realistic",
               "realism", "revision", "refinement", "improvement", "如何更真实", "修改建议",
               "改进建议", "改进", "润色", "修改"),
    "reply": ("final reply", "final message", "final response", "final answer", "reply",
              "response", "final", "最终回复", "最终回答", "最终发言", "最终消息", "回复", "回答"),
}

# Decorations a model puts around a label: markdown headers, bullets, numbering, bold, quotes.
_LABEL_PREFIX = r"[ \t>#*_\-•·+]*(?:\d{1,2}[.)、]?[ \t*_]*)?[\[【「『(\"'“]?[ \t*_]*"
_LABEL_SUFFIX = r"[ \t*_]*[\]】」』)\"'”]?[ \t*_]*(?:\([^)\n]{0,60}\)[ \t*_]*)?"
# A label ends in a colon / equals sign, or the value starts on the next line.
_LABEL_END = r"(?::|=|[ \t*_]*$)"


def _alias_regex(aliases: Mapping[str, tuple[str, ...]]) -> re.Pattern[str]:
    groups = []
    for name, words in aliases.items():
        alternation = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        groups.append(f"(?P<{name}>{alternation})")
    return re.compile(
        rf"^{_LABEL_PREFIX}(?:{'|'.join(groups)}){_LABEL_SUFFIX}{_LABEL_END}",
        re.IGNORECASE | re.MULTILINE,
    )


_ANALYZER_LABEL_RE = _alias_regex(_ANALYZER_ALIASES)
_ACTOR_LABEL_RE = _alias_regex(_ACTOR_ALIASES)

# Normalisation maps single characters to single characters, so offsets found in the
# normalised text slice the raw text too: the user's reply is returned exactly as written
# (full-width punctuation included) while labels and numbers are matched on ASCII forms.
_NORMALIZE_TABLE: dict[int, str] = {code: chr(code - 0xFEE0) for code in range(0xFF01, 0xFF5F)}
_NORMALIZE_TABLE.update({
    0x3000: " ",  # ideographic space
    0x2212: "-", 0x2013: "-", 0x2014: "-", 0xFE63: "-",  # minus and dashes
    0x200B: " ", 0x200C: " ", 0x200D: " ", 0x2060: " ", 0xFEFF: " ",  # zero-width
    0x0D: " ",  # a \r before \n would hide the end of a line from `$`
})
_SIGNED_RE = re.compile(r"(?<![A-Za-z0-9_.+\-])([+\-])(\d+(?:\.\d+)?)")
# Two emotion VALUES joined by an arrow, "from A to B", 由A到B / 从A降到B: the change is
# B - A. Endpoints are unsigned (emotions are 0..100); a signed start is a change, not a value.
_NUM = r"(?<![A-Za-z0-9_.+\-])(\d+(?:\.\d+)?)(?:\s*(?:分|points?|pts?))?"
_ARROW = r"(?:-+>|=+>|~+>|[\u2192\u27f6\u2794\u279c\u279d\u279e\u21d2\u27a1\u2b62\u21fe])"
_TRANSITION_RE = re.compile(
    rf"(?:(?:from|由|从)\s*)?{_NUM}\s*(?:{_ARROW}|[^\d\n+\-]{{0,12}}?(?:\bto\b|到|至|{_ARROW}))"
    rf"\s*{_NUM}",
    re.IGNORECASE,
)
# An unsigned number right after one of these is a value ("went up to 35", "降到25",
# "now at 40"), never a change.
_VALUE_CUE_RE = re.compile(
    r"(?:\bto|\bat|\bnow|\breach(?:ed|es)?|\bbecomes?|\bbecame|\bcurrent(?:ly)?|"
    r"到|至|为|成|达到|当前|现在|目前)\s*(?:了\s*)?$",
    re.IGNORECASE,
)
_UNSIGNED_RE = re.compile(r"(?<![A-Za-z0-9_.])(\d+(?:\.\d+)?)")
_NEGATIVE_WORDS = ("decrease", "decreased", "drop", "dropped", "down", "lower", "minus", "fall",
                   "fell", "negative", "下降", "降低", "减少", "下跌", "减", "降", "负")
_ZERO_WORDS = ("no change", "unchanged", "none", "nothing", "无变化", "没有变化", "不变", "没变化", "持平")
_WRAP_CHARS = " \t\r\n*_`#>\"'“”‘’「」『』【】[]()<>"
# How far after an inline "emotion change" label the number may sit.
_INLINE_DELTA_WINDOW = 80
# A last line that is only a number (with an optional unit) is taken as the change.
_BARE_NUMBER_RE = re.compile(r"[+\-]?\d+(?:\.\d+)?\s*(?:分|points?|pts?)?", re.IGNORECASE)
_FALLBACK_DELTA_LABELS = re.compile(
    r"(?:emotion\s*change|change\s*in\s*emotion|emotion\s*delta|情绪变化值?|情绪值变化)",
    re.IGNORECASE,
)


def as_text(text: Any) -> str:
    if isinstance(text, str):
        return text
    if text is None:
        return ""
    try:
        return str(text)
    except Exception:  # an object whose __str__ fails must not break a parser
        return ""


def _normalize(text: str) -> str:
    """Same length as `text`: full-width ASCII forms, dashes and zero-width marks mapped."""
    return text.translate(_NORMALIZE_TABLE)


def _fields(norm: str, label_re: re.Pattern[str]) -> list[tuple[str, int, int]]:
    """(field, value start, value end) in order of appearance; a value runs to the next label."""
    matches = list(label_re.finditer(norm))
    out = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(norm)
        out.append((m.lastgroup or "", m.end(), end))
    return out


_MARKDOWN_EDGES = " \t\r\n*_`#>\u3000\uff0a\uff03"
_PAIRS: tuple[tuple[str, str], ...] = (
    ('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("\u300c", "\u300d"),
    ("\u300e", "\u300f"), ("\u3010", "\u3011"), ("[", "]"), ("\uff3b", "\uff3d"),
    ("\uff02", "\uff02"), ("\uff07", "\uff07"),
)


def _clean_value(value: str) -> str:
    """Strips markdown at both ends and quotes / brackets that wrap the whole value."""
    value = value.strip(_MARKDOWN_EDGES)
    changed = True
    while changed and value:
        changed = False
        for left, right in _PAIRS:
            if len(value) >= 2 and value.startswith(left) and value.endswith(right):
                value = value[len(left): len(value) - len(right)].strip(_MARKDOWN_EDGES)
                changed = True
    return value


def _first_line(value: str) -> str:
    for line in value.split("\n"):
        if line.strip().strip(_WRAP_CHARS):
            return line
    return ""


def _to_int(number: str) -> int:
    return int(round(float(number)))


def _extract_delta(value: str) -> int | None:
    """A signed integer from a field value: "+5", "-10", "[+3]", "5分", "减少5", "no change",
    "30 -> 35", "from 30 to 25", "由30降到25". None when nothing reads as a change, or when
    the value is ambiguous (a transition and an explicit sign that disagree, a bare value
    such as "up to 35"): the caller retries rather than misreading an emotion value."""
    line = _first_line(value)
    lowered = line.lower()
    transitions = list(_TRANSITION_RE.finditer(line))
    if transitions:
        diffs = {_to_int(m.group(2)) - _to_int(m.group(1)) for m in transitions}
        spans = [m.span() for m in transitions]
        outside = [m for m in _SIGNED_RE.finditer(line)
                   if not any(a <= m.start() < b for a, b in spans)]
        signed = {_to_int(m.group(2)) * (-1 if m.group(1) == "-" else 1) for m in outside}
        if len(diffs) != 1 or (signed and signed != diffs):
            return None
        delta = diffs.pop()
    elif (signed := _SIGNED_RE.search(line)) is not None:
        delta = _to_int(signed.group(2)) * (-1 if signed.group(1) == "-" else 1)
    elif (unsigned := _UNSIGNED_RE.search(line)) is not None:
        before = lowered[: unsigned.start()]
        # "30 - > 25", "5, now 35": with no sign, two numbers cannot be told apart.
        if _VALUE_CUE_RE.search(before) or len(_UNSIGNED_RE.findall(line)) > 1:
            return None
        negative = any(w in before for w in _NEGATIVE_WORDS)
        delta = -_to_int(unsigned.group(1)) if negative else _to_int(unsigned.group(1))
    elif any(w in lowered for w in _ZERO_WORDS):
        delta = 0
    else:
        return None
    return delta if abs(delta) <= MAX_PARSED_ABS_DELTA else None


@dataclasses.dataclass(frozen=True)
class AnalyzerResult:
    """Parsed analyzer output. `delta` is None when no emotion change could be read (then
    `ok` is False); `fields` maps ANALYZER_FIELDS names to the text found; `raw` is the
    input text."""

    delta: int | None
    fields: dict[str, str]
    ok: bool
    raw: str = ""


@dataclasses.dataclass(frozen=True)
class ActorResult:
    """Parsed actor output. `reply` is the user's message: the last "final reply" field
    (`ok` True), else a best effort (unlabelled text or the draft, `ok` False) or None.
    `goodbye` says whether the reply holds a goodbye word."""

    reply: str | None
    ok: bool
    goodbye: bool
    fields: dict[str, str] = dataclasses.field(default_factory=dict)




def parse_analyzer(text: Any) -> AnalyzerResult:
    """Reads the five analyzer fields and the signed emotion change. Never raises.

    The change is taken from the last "emotion change" field that holds a number; failing
    that, from an inline "emotion change ... N" anywhere; failing that, from a last line that
    is just a number. Full-width punctuation, markdown, brackets, quotes, "+5", "5分" and
    decimals (rounded) are accepted; a change beyond +-MAX_PARSED_ABS_DELTA is rejected.
    """
    raw = as_text(text)
    try:
        norm = _normalize(raw)
        found = _fields(norm, _ANALYZER_LABEL_RE)
        fields: dict[str, str] = {}
        for name, start, end in found:
            if name != "delta" and name not in _LABEL_ONLY_FIELDS:
                fields[name] = _clean_value(raw[start:end])
        delta = None
        for name, start, end in reversed(found):
            if name == "delta":
                delta = _extract_delta(norm[start:end])
                if delta is not None:
                    fields["delta"] = _clean_value(_first_line(raw[start:end]))
                    break
        if delta is None:
            for m in reversed(list(_FALLBACK_DELTA_LABELS.finditer(norm))):
                tail = norm[m.end(): m.end() + _INLINE_DELTA_WINDOW].lstrip(" \t:=*_)]\u3011")
                delta = _extract_delta(tail)
                if delta is not None:
                    break
        if delta is None:
            lines = [ln.strip(_WRAP_CHARS) for ln in norm.split("\n") if ln.strip(_WRAP_CHARS)]
            if lines and _BARE_NUMBER_RE.fullmatch(lines[-1]):
                delta = _extract_delta(lines[-1])
        return AnalyzerResult(delta=delta, fields=fields, ok=delta is not None, raw=raw)
    except Exception:  # the parser must never take the rollout down
        return AnalyzerResult(delta=None, fields={}, ok=False, raw=raw)


def contains_goodbye(text: Any, words: Sequence[str] | None = None) -> bool:
    """Whether `text` holds a goodbye word (whole word for Latin words, case-insensitive)."""
    try:
        norm = _normalize(as_text(text)).lower()
        for word in words or tuple(DEFAULT_GOODBYE_WORDS.values()):
            w = _normalize(as_text(word)).lower().strip()
            if not w:
                continue
            if re.fullmatch(r"[\w' -]+", w, re.ASCII):
                if re.search(rf"(?<![a-z]){re.escape(w)}(?![a-z])", norm):
                    return True
            elif re.search(re.escape(w) + _GOODBYE_NOT_FOLLOWED_BY.get(w, ""), norm):
                return True
        return False
    except Exception:
        return False


def _clean_reply(value: str) -> str:
    value = value.strip()
    # The reply is one message: a blank line starts the model's own commentary.
    value = re.split(r"\n\s*\n", value, maxsplit=1)[0]
    return _clean_value(value)


def parse_actor(text: Any, goodbye_words: Sequence[str] | None = None) -> ActorResult:
    """Reads the actor's fields; the user's message is the last "final reply" field.

    Never raises. Without a reply label the result is not ok: `reply` is then the cleaned
    text when no label at all was found, else the draft (or None), so that a caller out of
    retries still has something to say. `goodbye_words` default: every language's default.
    """
    raw = as_text(text)
    try:
        found = _fields(_normalize(raw), _ACTOR_LABEL_RE)
        fields = {name: _clean_value(raw[start:end]) for name, start, end in found}
        reply = None
        for name, start, end in reversed(found):
            if name == "reply":
                reply = _clean_reply(raw[start:end]) or None
                if reply is not None:
                    break
        ok = reply is not None
        if ok:
            fields["reply"] = reply
        elif not found:
            reply = _clean_reply(raw) or None
        elif fields.get("draft"):
            reply = _clean_reply(fields["draft"]) or None
        goodbye = contains_goodbye(reply or "", goodbye_words)
        return ActorResult(reply=reply, ok=ok, goodbye=goodbye, fields=fields)
    except Exception:  # the parser must never take the rollout down
        return ActorResult(reply=None, ok=False, goodbye=False, fields={})



def analysis_fields(analysis: AnalyzerResult | str | None) -> list[tuple[str | None, str]]:
    """The analysis without its change, as (field, value) in order, for the actor to read.

    The actor gets the level, never the number, so the change field (and the labels that name
    the current value) are left out. Text with no labels at all is one entry named None.
    """
    if analysis is None:
        return []
    raw = analysis.raw if isinstance(analysis, AnalyzerResult) else as_text(analysis)
    found = _fields(_normalize(raw), _ANALYZER_LABEL_RE)
    if not found:
        return [(None, raw.strip())]
    out = []
    for name, start, end in found:
        value = _clean_value(raw[start:end])
        if name != "delta" and name not in _LABEL_ONLY_FIELDS and value:
            out.append((name, value))
    return out
