"""The simulated user's emotion state machine: one dialogue's emotion, turns and ending.

Emotion update: ``delta`` is clamped to ``[-delta_clamp, delta_clamp]`` when a clamp is set,
then ``emotion = min(emotion + delta, 100)`` as in the reference code, then raised to
``emotion_floor`` (0 by default). The floor is our addition: RLVER.md describes the emotion as
an integer in 0..100, and the floor changes neither the reward (clipped at 0 anyway) nor any
termination (a dialogue at or below the floor has already ended on ``end_below``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from rlver_jax.env.sim_parse import ActorResult, AnalyzerResult, contains_goodbye
from rlver_jax.env.sim_settings import (
    EMOTION_LEVELS,
    EMOTION_MAX,
    FAIL_LEVEL,
    LANGUAGES,
    SimulatorSettings,
    goodbye_word,
    resolve_language,
)

__all__ = [
    "FALLBACK_USER_REPLY",
    "TERMINATION_REASONS",
    "DialogueState",
    "RetryDecision",
    "TurnRecord",
    "add_policy_reply",
    "add_user_message",
    "apply_analysis",
    "apply_delta",
    "decide_retry",
    "emotion_level",
    "new_dialogue",
    "reward",
    "termination_reason",
]

TERMINATION_REASONS: tuple[str, ...] = ("emotion_low", "emotion_high", "goodbye", "turn_limit")
# What the user says when every actor attempt failed to parse and nothing usable was left.
FALLBACK_USER_REPLY: dict[str, str] = {"en": "Hmm.", "zh": "嗯。"}



def emotion_level(emotion: int | float) -> str:
    """The level letter: S >= 100, A >= 70, B >= 40, C >= 10, F below."""
    for name, threshold in EMOTION_LEVELS:
        if emotion >= threshold:
            return name
    return FAIL_LEVEL


def reward(final_emotion: int | float) -> float:
    """The dialogue's scalar reward: clip(final_emotion / 100, 0, 1)."""
    return float(min(max(final_emotion / EMOTION_MAX, 0.0), 1.0))


@dataclasses.dataclass
class TurnRecord:
    """What one policy reply did to the user's emotion (one per analyzer step).

    `raw_delta` is what the analyzer wrote (None when it failed to parse and the fallback was
    used); `delta` is the change actually applied after the clamp and the bounds.
    """

    turn: int
    emotion_before: int
    emotion_after: int
    delta: int
    raw_delta: int | None
    parse_ok: bool
    parse_failures: int
    analyzer_text: str
    user_reply: str | None = None


@dataclasses.dataclass
class DialogueState:
    """One dialogue. `history` holds (role, text) with role "user" (the simulated person) or
    "assistant" (the policy, its raw generation, thoughts included). `turns` counts policy
    replies that have been analysed. `think`: the policy writes <think>...</think> before its
    replies, so the simulator reads only what follows the last </think>; without think mode
    it reads the whole reply (a stray "<think>" hides nothing)."""

    dialogue_id: str
    profile: Any
    emotion: int
    history: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    turns: int = 0
    done: bool = False
    done_reason: str | None = None
    records: list[TurnRecord] = dataclasses.field(default_factory=list)
    think: bool = True

    @property
    def level(self) -> str:
        return emotion_level(self.emotion)

    @property
    def reward(self) -> float:
        return reward(self.emotion)


def new_dialogue(dialogue_id: str, profile: Any, settings: SimulatorSettings,
                 think: bool = True) -> DialogueState:
    """A fresh dialogue at the settings' start emotion; `think`: the policy's mode."""
    return DialogueState(
        dialogue_id=str(dialogue_id), profile=profile, emotion=settings.start_emotion,
        think=think,
    )


def apply_delta(
    state_or_emotion: DialogueState | int, delta: int, settings: SimulatorSettings
) -> int:
    """The emotion after a change: clamp the change, cap at 100, raise to the floor.

    Pure: returns the new emotion and does not modify a state passed in (`apply_analysis`
    does the bookkeeping).
    """
    if isinstance(state_or_emotion, DialogueState):
        emotion = state_or_emotion.emotion
    else:
        emotion = state_or_emotion
    delta = int(delta)
    if settings.delta_clamp is not None:
        delta = max(-settings.delta_clamp, min(delta, settings.delta_clamp))
    new = min(int(emotion) + delta, EMOTION_MAX)
    if settings.emotion_floor is not None:
        new = max(new, settings.emotion_floor)
    return new


def termination_reason(
    emotion: int, turns: int, settings: SimulatorSettings, *, goodbye: bool = False
) -> str | None:
    """Why the dialogue ends now, or None.

    Checked in this order: "emotion_low" (emotion < end_below), "emotion_high"
    (emotion >= end_at_or_above), "goodbye" (the user's message held the goodbye word),
    "turn_limit" (turns >= max_turns).
    """
    if settings.end_below is not None and emotion < settings.end_below:
        return "emotion_low"
    if settings.end_at_or_above is not None and emotion >= settings.end_at_or_above:
        return "emotion_high"
    if goodbye:
        return "goodbye"
    if turns >= settings.max_turns:
        return "turn_limit"
    return None


def add_policy_reply(state: DialogueState, text: str) -> None:
    """Appends the policy's raw generation (thoughts included) to the history."""
    if state.done:
        raise ValueError(f"dialogue {state.dialogue_id!r} has ended ({state.done_reason})")
    state.history.append(("assistant", text))


def apply_analysis(
    state: DialogueState,
    delta: int,
    settings: SimulatorSettings,
    *,
    raw_delta: int | None = None,
    parse_ok: bool = True,
    parse_failures: int = 0,
    analyzer_text: str = "",
) -> str | None:
    """Applies one analyzer step: updates emotion and turns, records it, checks termination.

    `delta` is the change to apply (the parsed one, or `settings.fallback_delta`). Returns the
    termination reason (also stored in `state.done_reason`) or None.
    """
    if state.done:
        raise ValueError(f"dialogue {state.dialogue_id!r} has ended ({state.done_reason})")
    before = state.emotion
    state.emotion = apply_delta(before, delta, settings)
    state.turns += 1
    state.records.append(
        TurnRecord(
            turn=state.turns,
            emotion_before=before,
            emotion_after=state.emotion,
            delta=state.emotion - before,
            raw_delta=raw_delta,
            parse_ok=parse_ok,
            parse_failures=parse_failures,
            analyzer_text=analyzer_text,
        )
    )
    reason = termination_reason(state.emotion, state.turns, settings)
    if reason is not None:
        state.done, state.done_reason = True, reason
    return reason


def add_user_message(state: DialogueState, text: str, settings: SimulatorSettings) -> str | None:
    """Appends the simulated user's message; ends the dialogue on the goodbye word.

    The goodbye word counts anywhere in the message (as in the reference code), except in
    the opening message. Returns "goodbye" when the message ends the dialogue, else None.
    """
    if state.done:
        raise ValueError(f"dialogue {state.dialogue_id!r} has ended ({state.done_reason})")
    state.history.append(("user", text))
    if state.records:
        state.records[-1].user_reply = text
    lang = resolve_language(state.profile, settings)
    # The opening never ends a dialogue: no policy reply has been judged yet.
    said_goodbye = state.turns > 0 and contains_goodbye(text, (goodbye_word(settings, lang),))
    reason = termination_reason(state.emotion, state.turns, settings, goodbye=said_goodbye)
    # Only the goodbye can be new here: the emotion and turn checks ran in apply_analysis.
    if reason == "goodbye":
        state.done, state.done_reason = True, reason
        return reason
    return None


# --- retry policy ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RetryDecision:
    """What to do after the simulator attempts so far.

    action: "accept" (the last attempt parsed), "retry" (sample again), or "fallback" (out of
      retries: use `delta` / `reply` as given here).
    delta: the emotion change to apply (analyzer attempts; None on "retry").
    reply: the user message to use (actor attempts; None on "retry").
    failures: attempts that failed to parse so far.
    """

    action: str
    delta: int | None
    reply: str | None
    failures: int


def decide_retry(
    attempts: Sequence[AnalyzerResult | ActorResult],
    settings: SimulatorSettings,
    language: str = "en",
) -> RetryDecision:
    """Retry or fall back, given the parse results of one step's attempts in order.

    At most `1 + settings.parse_retries` attempts are made. Analyzer fallback: the change is
    `settings.fallback_delta`. Actor fallback: the last attempt's best-effort reply (text that
    had no labels, or the draft), else a short neutral message (FALLBACK_USER_REPLY).
    """
    if not attempts:
        return RetryDecision("retry", None, None, 0)
    failures = sum(1 for a in attempts if not a.ok)
    last = attempts[-1]
    is_actor = isinstance(last, ActorResult)
    if last.ok:
        if is_actor:
            return RetryDecision("accept", None, last.reply, failures)
        return RetryDecision("accept", last.delta, None, failures)
    if len(attempts) <= settings.parse_retries:
        return RetryDecision("retry", None, None, failures)
    if is_actor:
        best = next((a.reply for a in reversed(attempts) if a.reply), None)
        lang = language if language in LANGUAGES else LANGUAGES[0]
        return RetryDecision("fallback", None, best or FALLBACK_USER_REPLY[lang], failures)
    return RetryDecision("fallback", settings.fallback_delta, None, failures)
