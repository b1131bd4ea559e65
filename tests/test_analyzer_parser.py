"""The analyzer parser never reads an emotion VALUE as a change (issue #17, item 1).

A property test generates analyzer outputs the way models write them (English or Chinese
labels, any field order, markdown / brackets / full-width decorations, a signed change, a
transition "A -> B" / "from A to B" / 由A降到B, an extra current-value line) and checks that
the parsed change is the intended one. Forms that are ambiguous by design may fail to parse
(the rollout then retries) but must never give a wrong number.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlver_jax.env.simulator import parse_analyzer

ISSUE_CASES = [
    # The misreads the audit found: each one used to parse as the absolute value.
    ("情绪变化：由30降到25", -5),
    ("Emotion change: went from 30 to 25", -5),
    ("Emotion change: 30 → 35", 5),
    ("情绪变化：-5\n情绪值：25", -5),
    # Neighbours of those.
    ("情绪变化：从30上升到35分", 5),
    ("Emotion change: 30->35", 5),
    ("Emotion change: 30 -> 35 (+5)", 5),
    ("情绪变化：30分→25分", -5),
    ("当前情绪值：35\n情绪变化：+5", 5),
    ("Emotion change: +5\nCurrent emotion: 35", 5),
    ("Emotion change: dropped by 5", -5),
    ("Emotion change: +3 (range -10 to +10)", 3),
    # Ambiguous or only a value: a failure (retry), never a number.
    ("Emotion change: 30 -> 36 (+5)", None),
    ("Emotion change: up to 35", None),
    ("情绪变化：降到25", None),
    ("Emotion: 35", None),
    ("情绪值：25", None),
    ("Emotion change: 30 - > 25", None),
    ("Emotion change: 5, now 35", None),
]


@pytest.mark.parametrize("text,delta", ISSUE_CASES)
def test_values_are_never_changes(text, delta):
    result = parse_analyzer(text)
    assert (result.delta, result.ok) == (delta, delta is not None)


def test_current_value_line_is_not_a_field_and_not_shown_to_the_actor():
    from rlver_jax.env.simulator import SimulatorSettings, render_actor_prompt
    text = "Intent: cheer\nFeeling: ok\nEmotion change: +4\nCurrent emotion: 57"
    result = parse_analyzer(text)
    assert result.delta == 4 and set(result.fields) == {"intent", "feeling", "delta"}
    prompt = " ".join(m["content"] for m in render_actor_prompt(
        None, [("user", "hi")], result, "B", SimulatorSettings(language="en")))
    assert "57" not in prompt and "cheer" in prompt


# --- generated analyzer outputs ------------------------------------------------------------

LABELS = {
    "en": {"intent": ["Intent", "What the friend meant"], "fit": ["Fit", "Need fit"],
           "reaction": ["Inner reaction", "Reaction"], "feeling": ["Feeling", "Feelings"],
           "delta": ["Emotion change", "Change in emotion", "Emotion delta", "Mood change"],
           "current": ["Current emotion", "Emotion", "Emotion value", "New emotion"]},
    "zh": {"intent": ["意图", "对方的意图"], "fit": ["契合度", "贴合度"],
           "reaction": ["内心反应", "心理活动"], "feeling": ["感受", "情绪感受"],
           "delta": ["情绪变化", "情绪变化值", "情绪值变化"],
           "current": ["情绪值", "当前情绪值", "当前情绪"]},
}
# Field text: digits included, so that numbers outside the change field are exercised.
PROSE = {"en": ["they want to help", "it misses the point, 2 times now", "I feel a bit seen",
                "meh", "this is the 3rd time I explain it"],
         "zh": ["他想安慰我", "完全没说到点子上", "有点被理解了", "唉，第2次了", "还行吧"]}
FULLWIDTH = {ord(c): chr(ord(c) + 0xFEE0) for c in "0123456789+-:()[]"}


def _decorate_label(label: str, style: int) -> str:
    return [label, f"**{label}**", f"### {label}", f"【{label}】", f"- {label}",
            f"5. {label}", f"[{label}]"][style]


def _change_text(lang: str, delta: int, start: int, form: int) -> str:
    """The change written in one of several ways; `start` is the emotion before."""
    end = start + delta
    sign = f"{delta:+d}"
    if form == 0:
        return sign
    if form == 1:
        return f"{start} → {end}" if lang == "en" else f"{start}→{end}"
    if form == 2:
        return f"from {start} to {end}" if lang == "en" else f"由{start}{'降' if delta < 0 else '升'}到{end}"
    if form == 3:
        return f"went from {start} to {end} ({sign})" if lang == "en" else f"{sign}（从{start}到{end}）"
    if form == 4:
        return f"{start}->{end}"
    if form == 5:
        return f"[{sign}]" if lang == "en" else f"【{sign}】"
    if form == 6:
        return f"**{sign}**"
    return f"{sign} points" if lang == "en" else f"{sign}分"


@st.composite
def analyzer_outputs(draw):
    lang = draw(st.sampled_from(["en", "zh"]))
    delta = draw(st.integers(-30, 30))
    start = draw(st.integers(max(0, -delta), min(100, 100 - delta)))
    fields = ["intent", "fit", "reaction", "feeling"]
    order = draw(st.permutations(fields + ["delta"]))
    with_current = draw(st.booleans())
    if with_current:
        # The current value, before or after the change: never to be read as the change.
        order = list(order)
        order.insert(draw(st.integers(0, len(order))), "current")
    colon = draw(st.sampled_from([":", "：", " =", ":\n"]))
    style = draw(st.integers(0, 6))
    form = draw(st.integers(0, 7))
    lines = []
    for name in order:
        label = _decorate_label(draw(st.sampled_from(LABELS[lang][name])), style)
        if name == "delta":
            value = _change_text(lang, delta, start, form)
        elif name == "current":
            value = str(start + delta if draw(st.booleans()) else start)
        else:
            value = draw(st.sampled_from(PROSE[lang]))
        lines.append(f"{label}{colon} {value}")
    text = "\n".join(lines)
    if draw(st.booleans()):
        text = text.translate(FULLWIDTH)
    if draw(st.booleans()):
        text = draw(st.sampled_from(["Sure, here is my analysis.\n", "分析如下：\n\n"])) + text
    return text, delta


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(analyzer_outputs())
def test_generated_outputs_parse_to_the_intended_change(case):
    text, delta = case
    result = parse_analyzer(text)
    # Every generated form is unambiguous: it must parse, and to the intended change.
    assert result.ok, text
    assert result.delta == delta, text


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(analyzer_outputs(), st.integers(1, 60), st.integers(0, 40))
def test_a_bare_value_with_no_change_never_parses(case, value, start):
    # Replace the change field by a current value only: there is no change to read.
    text, _ = case
    lines = [ln for ln in text.split("\n") if ln.strip()]
    no_change = "\n".join(ln for ln in lines if not any(
        lab in ln.translate({v: k for k, v in FULLWIDTH.items()})
        for lab in ("Emotion change", "Change in emotion", "Emotion delta", "Mood change",
                    "情绪变化", "情绪值变化", "+", "-", "→")))
    for extra in (f"Current emotion: {value}", f"情绪值：{value}", f"Emotion: now {value}",
                  f"情绪变化：降到{value}", f"Emotion change: up to {value}",
                  f"Emotion change: {start} -> {start + value} (+{value + 1})"):
        result = parse_analyzer(f"{no_change}\n{extra}")
        assert not result.ok, f"{no_change}\n{extra}"
