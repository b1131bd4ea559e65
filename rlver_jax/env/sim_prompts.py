"""The simulated user's prompts: the analyzer's and the actor's chat messages.

The wording lives in `prompts/`: the chat templates (`analyzer_{lang}.txt`, `actor_{lang}.txt`,
`opening_{lang}.txt`) and the sentences that the settings switch in and out
(`knobs_{lang}.txt`, read with `templates.knob_text`). This module only picks and fills them.
Both prompts are laid out for cache reuse: persona and rules first, then the transcript, then
what changes every turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rlver_jax.env.policy_prompt import visible_reply
from rlver_jax.env.profiles import personality
from rlver_jax.env.sim_parse import AnalyzerResult, analysis_fields
from rlver_jax.env.sim_settings import EMOTION_LEVELS, FAIL_LEVEL, SimulatorSettings, goodbye_word, resolve_language
from rlver_jax.env.templates import knob_text, load_template, render

__all__ = ["render_actor_prompt", "render_analyzer_prompt"]

_LEVELS = frozenset(name for name, _ in EMOTION_LEVELS) | {FAIL_LEVEL}


def _personality_name(profile: Any) -> str | None:
    try:
        return personality(profile.main_cha)
    except Exception:  # unknown type or a duck-typed profile: the raw label still renders
        return None


def _persona_values(profile: Any, lang: str) -> dict[str, str]:
    scene = str(getattr(profile, "scene", "") or "").strip()
    task = str(getattr(profile, "task", "") or "").strip()
    traits = getattr(profile, "cha_group", ()) or ()
    return {
        "persona": str(getattr(profile, "player", "") or "").strip(),
        "personality": str(getattr(profile, "main_cha", "") or "").strip(),
        "traits": knob_text(lang, "trait_separator").join(str(t) for t in traits),
        "scene": scene,
        "hidden_need": task,
    }


def _transcript(history: Sequence[tuple[str, str]], lang: str, think: bool = True) -> str:
    lines = []
    for role, text in history:
        shown = visible_reply(text, think) if role == "assistant" else text
        name = knob_text(lang, f"transcript.{role}") if role in ("user", "assistant") else role
        lines.append(knob_text(lang, "transcript.line").format(name=name, text=shown.strip()))
    return "\n".join(lines) if lines else knob_text(lang, "transcript.empty")


def render_analyzer_prompt(
    profile: Any,
    history: Sequence[tuple[str, str]],
    latest_reply: str,
    emotion: int,
    settings: SimulatorSettings,
    think: bool = True,
) -> list[dict[str, str]]:
    """Chat messages for the analyzer step.

    `history` is the dialogue before `latest_reply` (the policy's newest raw generation; in
    think mode its thoughts are removed). `emotion` is the CURRENT emotion (the reference
    code wrongly showed the initial one).
    """
    lang = resolve_language(profile, settings)
    hist = list(history)
    # Forgive a history that already ends with the latest reply rather than showing it twice.
    if (hist and hist[-1][0] == "assistant"
            and visible_reply(hist[-1][1], think) == visible_reply(latest_reply, think)):
        hist = hist[:-1]
    if settings.delta_clamp is not None:
        delta_range = knob_text(lang, "delta_range.clamped").format(c=settings.delta_clamp)
    else:
        delta_range = knob_text(lang, "delta_range.free").format(h=settings.delta_hint)
    values = _persona_values(profile, lang)
    values.update(
        acceptance=knob_text(lang, f"acceptance.{settings.reserve}"),
        emotion=str(int(emotion)),
        history=_transcript(hist, lang, think),
        latest_reply=visible_reply(latest_reply, think),
        delta_range=delta_range,
    )
    return render(f"analyzer_{lang}", **values)



def _analysis_text(analysis: AnalyzerResult | str | None, lang: str) -> str:
    parts = []
    for name, value in analysis_fields(analysis):
        parts.append(value if name is None else f"{knob_text(lang, f'field_title.{name}')}: {value}")
    return "\n".join(parts)


def render_actor_prompt(
    profile: Any,
    history: Sequence[tuple[str, str]],
    analysis: AnalyzerResult | str | None,
    level: str,
    settings: SimulatorSettings,
    think: bool = True,
) -> list[dict[str, str]]:
    """Chat messages for the actor step (`think`: as in `render_analyzer_prompt`).

    `level` is the letter from `emotion_level` (the actor never sees the number). At a level
    in `settings.goodbye_levels` the actor is told to say goodbye with the goodbye word. An
    empty history asks for the opening message instead of a reply.
    """
    lang = resolve_language(profile, settings)
    level_text = knob_text(lang, f"level.{level}") if level in _LEVELS else level
    if level in settings.goodbye_levels and history:
        level_text += "\n" + knob_text(lang, "goodbye_rule").format(word=goodbye_word(settings, lang))
    if history:
        task_instruction = knob_text(lang, "reply_task")
    else:
        topic = getattr(profile, "topic", None)
        clause = knob_text(lang, "topic_clause").format(topic=topic.strip()) if topic and topic.strip() else ""
        task_instruction = load_template(f"opening_{lang}")[0].format(topic_clause=clause)
    text = _analysis_text(analysis, lang).strip()
    values = _persona_values(profile, lang)
    values.update(
        hint_rule=knob_text(lang, "hint_need.yes" if settings.hint_need else "hint_need.no"),
        reserve_rule=knob_text(lang, f"reserve.{settings.reserve}"),
        level_text=level_text,
        history=_transcript(history, lang, think),
        analysis_block=f"{knob_text(lang, 'analysis_header')}\n{text}\n\n" if text else "",
        task_instruction=task_instruction,
        persona_rule=knob_text(lang, "passive_rule") if _personality_name(profile) == "passive" else "",
    )
    return render(f"actor_{lang}", **values)

