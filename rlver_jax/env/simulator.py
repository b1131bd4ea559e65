"""The simulated user of RLVER as pure Python: settings, emotion state, prompts and parsing.

No model is called here. The dialogue rollout renders prompts with the functions below, runs
the batched sampler on them and hands the generated text back to the parsers. One user turn
is two simulator calls (see RLVER.md):

1. Analyzer (`render_analyzer_prompt` -> sampler -> `parse_analyzer`): five labelled fields,
   the last a signed integer emotion change.
2. Actor (`render_actor_prompt` -> sampler -> `parse_actor`): four labelled fields, the last
   the user's message. With an empty history the actor writes the opening message.

State per dialogue lives in `DialogueState`, keyed by a stable `dialogue_id` so that replies
can never be routed to the wrong dialogue when others finish early (a fault of the reference
code). The typical order of calls for one dialogue:

    state = new_dialogue(dialogue_id, profile, settings)
    add_user_message(state, opening, settings)
    while not state.done:
        add_policy_reply(state, policy_text)          # raw generation, thoughts included
        ... analyzer attempts -> decide_retry(...) -> apply_analysis(state, delta, settings, ...)
        if state.done: break                          # emotion bound or turn limit
        ... actor attempts -> decide_retry(...) -> add_user_message(state, reply, settings)

Emotion update: ``delta`` is clamped to ``[-delta_clamp, delta_clamp]`` when a clamp is set,
then ``emotion = min(emotion + delta, 100)`` as in the reference code, then raised to
``emotion_floor`` (0 by default). The floor is our addition: RLVER.md describes the emotion as
an integer in 0..100, and the floor changes neither the reward (clipped at 0 anyway) nor any
termination (a dialogue at or below the floor has already ended on ``end_below``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "ACTOR_FIELDS",
    "ANALYZER_FIELDS",
    "DEFAULT_GOODBYE_WORDS",
    "DIFFICULTY_PRESETS",
    "EMOTION_LEVELS",
    "EMOTION_MAX",
    "FAIL_LEVEL",
    "FALLBACK_USER_REPLY",
    "LANGUAGES",
    "RESERVE_LEVELS",
    "TERMINATION_REASONS",
    "ActorResult",
    "AnalyzerResult",
    "DialogueState",
    "RetryDecision",
    "SimulatorSettings",
    "ThinkSplit",
    "TurnRecord",
    "add_policy_reply",
    "add_user_message",
    "apply_analysis",
    "apply_delta",
    "contains_goodbye",
    "decide_retry",
    "emotion_level",
    "goodbye_word",
    "load_template",
    "new_dialogue",
    "parse_actor",
    "parse_analyzer",
    "render_actor_prompt",
    "render_analyzer_prompt",
    "render_policy_messages",
    "resolve_language",
    "reward",
    "settings_from_config",
    "split_think",
    "termination_reason",
]

# --- constants ---------------------------------------------------------------------------

EMOTION_MAX = 100
# Level thresholds, highest first: a level holds when emotion >= its threshold.
EMOTION_LEVELS: tuple[tuple[str, int], ...] = (("S", 100), ("A", 70), ("B", 40), ("C", 10))
FAIL_LEVEL = "F"  # below the last threshold

LANGUAGES: tuple[str, ...] = ("en", "zh")
# "auto" follows the profile's language (profiles.profile_language).
LANGUAGE_CHOICES: tuple[str, ...] = ("auto", *LANGUAGES)
RESERVE_LEVELS: tuple[str, ...] = ("moderate", "reserved", "strict")
TERMINATION_REASONS: tuple[str, ...] = ("emotion_low", "emotion_high", "goodbye", "turn_limit")

DEFAULT_GOODBYE_WORDS: dict[str, str] = {"en": "Goodbye", "zh": "再见"}
# "再见到他" / "再见面" mean "see him again" / "meet again", not goodbye.
_GOODBYE_NOT_FOLLOWED_BY: dict[str, str] = {"再见": "(?![到面过着])"}
# What the user says when every actor attempt failed to parse and nothing usable was left.
FALLBACK_USER_REPLY: dict[str, str] = {"en": "Hmm.", "zh": "嗯。"}

# A parsed emotion change larger than this is not a change but a misread number (a year,
# the emotion itself): treated as a parse failure.
MAX_PARSED_ABS_DELTA = 100

# Separates the system part from the user part inside a template file.
TEMPLATE_USER_MARKER = "<<<USER>>>"
_PROMPT_DIR = Path(__file__).resolve().parent / "prompts"

# --- settings ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SimulatorSettings:
    """Knobs of the simulated user. Defaults are the RLVER training ("hard") simulator.

    Attributes:
      language: prompt language, "en", "zh", or "auto" (the profile's language).
      start_emotion: emotion at the start of every dialogue.
      delta_clamp: parsed changes are clamped to [-delta_clamp, +delta_clamp]; None: unclamped.
      max_turns: policy replies per dialogue; the dialogue ends after the reply that reaches it.
      end_below: the dialogue ends when emotion < end_below (None: never). Emotion is an
        integer, so the training rule "emotion <= 0" is end_below=1; SAGE's "< 10" is 10.
      end_at_or_above: the dialogue ends when emotion >= this (None: never; SAGE: 100).
      emotion_floor: lower bound of the emotion after an update (None: unbounded below).
      hint_need: the actor may hint at the hidden need (never state it).
      reserve: "moderate" | "reserved" | "strict": how guarded the user is and how hard to
        please (changes the wording of the actor and analyzer prompts).
      goodbye_word: the word that ends a dialogue; None: the language default
        (DEFAULT_GOODBYE_WORDS).
      goodbye_levels: levels at which the actor is told to say goodbye.
      parse_retries: extra simulator attempts after an unparsable output.
      fallback_delta: emotion change used when every analyzer attempt failed to parse.
      use_first_talk: open with the profile's fixed `first_talk` (evaluation) instead of a
        generated opening (training); profiles without one always get a generated opening.
      delta_hint: the usual size of a change quoted in the analyzer prompt when unclamped.
    """

    language: str = "auto"
    start_emotion: int = 30
    delta_clamp: int | None = None
    max_turns: int = 8
    end_below: int | None = 1
    end_at_or_above: int | None = None
    emotion_floor: int | None = 0
    hint_need: bool = False
    reserve: str = "moderate"
    goodbye_word: str | None = None
    goodbye_levels: tuple[str, ...] = ("S", FAIL_LEVEL)
    parse_retries: int = 2
    fallback_delta: int = 0
    use_first_talk: bool = False
    delta_hint: int = 20

    def __post_init__(self) -> None:
        if self.language not in LANGUAGE_CHOICES:
            raise ValueError(f"language must be one of {LANGUAGE_CHOICES}, got {self.language!r}")
        if self.reserve not in RESERVE_LEVELS:
            raise ValueError(f"reserve must be one of {RESERVE_LEVELS}, got {self.reserve!r}")
        for name in ("start_emotion", "max_turns", "parse_retries", "fallback_delta", "delta_hint"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("delta_clamp", "end_below", "end_at_or_above", "emotion_floor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer or None, got {value!r}")
        if self.delta_clamp is not None and self.delta_clamp < 0:
            raise ValueError(f"delta_clamp must be >= 0, got {self.delta_clamp}")
        if self.max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {self.max_turns}")
        if self.parse_retries < 0:
            raise ValueError(f"parse_retries must be >= 0, got {self.parse_retries}")
        if not isinstance(self.hint_need, bool) or not isinstance(self.use_first_talk, bool):
            raise ValueError("hint_need and use_first_talk must be booleans")
        levels = {name for name, _ in EMOTION_LEVELS} | {FAIL_LEVEL}
        bad = [lv for lv in self.goodbye_levels if lv not in levels]
        if bad:
            raise ValueError(
                f"goodbye_levels: unknown level {bad[0]!r}; levels are {sorted(levels)}"
            )
        if self.goodbye_word is not None and not self.goodbye_word.strip():
            raise ValueError("goodbye_word must not be blank")


DIFFICULTY_PRESETS: dict[str, SimulatorSettings] = {
    # SAGE evaluation: start 40, changes clamped to +-10, 10 turns, ends below 10 or at 100,
    # the need may be hinted, fixed first message.
    "sage": SimulatorSettings(
        start_emotion=40,
        delta_clamp=10,
        max_turns=10,
        end_below=10,
        end_at_or_above=100,
        hint_need=True,
        reserve="moderate",
        use_first_talk=True,
    ),
    # RLVER training simulator: start 30, unclamped, 8 turns, ends at emotion <= 0, the need
    # is never hinted, generated opening.
    "hard": SimulatorSettings(),
    # The difficulty ablation's stricter, more reserved simulator.
    "strict": SimulatorSettings(reserve="strict"),
}

_SETTING_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SimulatorSettings))
DEFAULT_PRESET = "hard"
PRESET_KEY = "preset"


def settings_from_config(cfg: Mapping[str, Any] | Any | None = None) -> SimulatorSettings:
    """Builds settings from a preset name plus overrides.

    `cfg` is a mapping (or an ml_collections ConfigDict) with an optional "preset" key
    (default "hard") and any `SimulatorSettings` field. An unknown key or preset raises
    ValueError naming it; values are validated by `SimulatorSettings`.
    """
    if cfg is None:
        cfg = {}
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise ValueError(f"simulator config must be a mapping, got {type(cfg).__name__}")
    overrides = dict(cfg)
    preset = overrides.pop(PRESET_KEY, DEFAULT_PRESET) or DEFAULT_PRESET
    if preset not in DIFFICULTY_PRESETS:
        raise ValueError(
            f"unknown simulator preset {preset!r}; known presets: {sorted(DIFFICULTY_PRESETS)}"
        )
    for key in overrides:
        if key not in _SETTING_FIELDS:
            raise ValueError(
                f"unknown simulator setting {key!r}; known settings: {PRESET_KEY}, "
                + ", ".join(_SETTING_FIELDS)
            )
    if "goodbye_levels" in overrides and not isinstance(overrides["goodbye_levels"], tuple):
        overrides["goodbye_levels"] = tuple(overrides["goodbye_levels"])
    return dataclasses.replace(DIFFICULTY_PRESETS[preset], **overrides)


# --- emotion state -----------------------------------------------------------------------


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


# --- language and templates --------------------------------------------------------------

_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def _detect_language(text: str) -> str:
    return "zh" if _CJK_RE.search(text or "") else "en"


def resolve_language(profile: Any, settings_or_lang: SimulatorSettings | str | None) -> str:
    """"en" or "zh": the settings' language, or the profile's when the setting is "auto"."""
    if isinstance(settings_or_lang, SimulatorSettings):
        lang = settings_or_lang.language
    else:
        lang = settings_or_lang
    if lang in LANGUAGES:
        return lang
    if profile is None:
        return LANGUAGES[0]
    try:
        from rlver_jax.env.profiles import profile_language

        return profile_language(profile)
    except Exception:  # a duck-typed profile, or profiles.py unavailable
        return _detect_language(f"{getattr(profile, 'player', '')}{getattr(profile, 'scene', '')}")


def goodbye_word(settings: SimulatorSettings, language: str) -> str:
    """The goodbye word in force: the configured one, else the language's default."""
    return settings.goodbye_word or DEFAULT_GOODBYE_WORDS.get(language, DEFAULT_GOODBYE_WORDS["en"])


@functools.lru_cache(maxsize=None)
def load_template(name: str) -> tuple[str, str | None]:
    """Reads prompts/<name>.txt; returns (system part, user part or None)."""
    text = (_PROMPT_DIR / f"{name}.txt").read_text(encoding="utf-8")
    if TEMPLATE_USER_MARKER in text:
        system, user = text.split(TEMPLATE_USER_MARKER, 1)
        return system.strip(), user.strip()
    return text.strip(), None


def _render(name: str, **values: str) -> list[dict[str, str]]:
    system, user = load_template(name)
    messages = [{"role": "system", "content": system.format(**values)}]
    if user is not None:
        messages.append({"role": "user", "content": user.format(**values)})
    return messages


# Per-language wording of the knobs. Kept next to the code that picks them so a reader sees
# which setting changes which sentence.
_ACCEPTANCE: dict[str, dict[str, str]] = {
    "en": {
        "moderate": "A sincere message that roughly meets what you hope for lifts your mood a "
        "little; a clearly off-target one lowers it.",
        "reserved": "You are hard to please. Only a message that addresses what you hope for "
        "specifically lifts your mood; generic kindness barely changes it, and off-target "
        "messages lower it.",
        "strict": "You are very hard to please and sceptical. Only a message that precisely "
        "meets what you hope for, in a natural and specific way, earns a small rise. Generic "
        "comfort, advice you did not ask for and formulaic empathy all lower your emotion. Be "
        "stingy with positive changes.",
    },
    "zh": {
        "moderate": "真诚且大致符合你期望的消息会让你心情稍好一些；明显跑题的消息会让心情变差。",
        "reserved": "你不容易被打动。只有明确回应了你内心期望的消息才会让心情变好；泛泛的好意几乎"
        "没有作用，跑题的消息会让心情变差。",
        "strict": "你非常难被打动，而且心存怀疑。只有自然、具体且恰好满足你内心期望的消息才能让"
        "情绪小幅上升。泛泛的安慰、你没要的建议、套路化的共情都会让情绪下降。给出正向变化时要非常吝啬。",
    },
}

_RESERVE: dict[str, dict[str, str]] = {
    "en": {
        "moderate": "You open up gradually when your friend responds well, and share details "
        "when asked kindly.",
        "reserved": "You are guarded: short messages, few details. You open up only after your "
        "friend has clearly earned it.",
        "strict": "You are very guarded and slow to trust: one or two short sentences at most. "
        "You deflect personal questions, stay cool even towards kind words, and share more only "
        "after several messages that truly meet what you hope for.",
    },
    "zh": {
        "moderate": "朋友回应得好时，你会慢慢敞开心扉；对方友善地问起时，你愿意多说一些细节。",
        "reserved": "你比较戒备：消息简短，很少透露细节。只有朋友明显赢得了你的信任，你才会多说。",
        "strict": "你非常戒备，很难信任别人：每次最多一两句短话。你会回避私人问题，即使面对好话也"
        "保持冷淡，只有在对方连续几次真正说到你心坎上之后才会多说一些。",
    },
}

_HINT_RULE: dict[str, dict[bool, str]] = {
    "en": {
        True: "When it feels natural you may drop small hints about what you hope for, but never "
        "say it outright.",
        False: "Never reveal or hint at what you hope for. Your friend has to work it out from "
        "how you react.",
    },
    "zh": {
        True: "在自然的时候，你可以稍微暗示自己希望得到什么，但绝不直接说出来。",
        False: "绝不透露或暗示你希望得到什么，让朋友从你的反应中自己去体会。",
    },
}

_LEVEL_TEXT: dict[str, dict[str, str]] = {
    "en": {
        "S": "Level S: you feel fully understood and much lighter.",
        "A": "Level A: you feel fairly good and are opening up.",
        "B": "Level B: you are so-so, still weighed down but willing to keep talking.",
        "C": "Level C: you feel low, irritated or let down by the chat.",
        "F": "Level F: you are fed up and want to leave the chat.",
    },
    "zh": {
        "S": "S 级：你觉得完全被理解了，心里轻松了很多。",
        "A": "A 级：你感觉还不错，开始愿意敞开心扉。",
        "B": "B 级：你心情一般，仍然有些沉重，但还愿意继续聊。",
        "C": "C 级：你情绪低落，对这次聊天感到烦躁或失望。",
        "F": "F 级：你已经受够了，想结束聊天。",
    },
}

_GOODBYE_RULE: dict[str, str] = {
    "en": 'End the chat now: your final reply says goodbye in your own way and contains the word '
    '"{word}".',
    "zh": "现在结束聊天：你的最终回复用你自己的方式道别，并且包含“{word}”这个词。",
}

_PASSIVE_RULE: dict[str, str] = {
    "en": " You are a passive person: do not ask questions.",
    "zh": "你是被动型的人：不要提问。",
}

_DELTA_RANGE: dict[str, dict[str, str]] = {
    "en": {
        "clamped": "one signed integer between -{c} and +{c}, e.g. +3 or -5, and nothing else.",
        "free": "one signed integer, e.g. +4 or -6, and nothing else. Changes are usually "
        "within -{h} to +{h}; go beyond only for a message that deeply moves or deeply hurts you.",
    },
    "zh": {
        "clamped": "一个带正负号的整数，范围在 -{c} 到 +{c} 之间，例如 +3 或 -5，不要写别的内容。",
        "free": "一个带正负号的整数，例如 +4 或 -6，不要写别的内容。变化通常在 -{h} 到 +{h} 之间；"
        "只有让你深受触动或深受伤害的消息才超出这个范围。",
    },
}

_TRANSCRIPT: dict[str, dict[str, str]] = {
    "en": {"user": "You", "assistant": "Friend", "sep": ": ", "empty": "(no messages yet)"},
    "zh": {"user": "你", "assistant": "朋友", "sep": "：", "empty": "（还没有消息）"},
}

_ANALYSIS_HEADER: dict[str, str] = {
    "en": "# How your friend's last message landed with you\n",
    "zh": "# 朋友上一条消息给你的感受\n",
}

_REPLY_TASK: dict[str, str] = {
    "en": "Reply to your friend's newest message.",
    "zh": "回复朋友最新发来的消息。",
}

_TOPIC_CLAUSE: dict[str, str] = {"en": " ({topic})", "zh": "（{topic}）"}

_TRAIT_SEPARATOR: dict[str, str] = {"en": ", ", "zh": "、"}


def _personality_name(profile: Any) -> str | None:
    try:
        from rlver_jax.env.profiles import personality

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
        "traits": _TRAIT_SEPARATOR[lang].join(str(t) for t in traits),
        "scene": scene,
        "hidden_need": task,
    }


def _visible(text: str, think: bool = True) -> str:
    # In think mode the simulator only ever sees what follows the policy's last </think>;
    # without it the reply is shown whole (a stray tag must not hide the rest).
    return split_think(text).reply if think else _as_text(text).strip()


def _transcript(history: Sequence[tuple[str, str]], lang: str, think: bool = True) -> str:
    names = _TRANSCRIPT[lang]
    lines = []
    for role, text in history:
        shown = _visible(text, think) if role == "assistant" else text
        lines.append(f"{names.get(role, role)}{names['sep']}{shown.strip()}")
    return "\n".join(lines) if lines else names["empty"]


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
            and _visible(hist[-1][1], think) == _visible(latest_reply, think)):
        hist = hist[:-1]
    if settings.delta_clamp is not None:
        delta_range = _DELTA_RANGE[lang]["clamped"].format(c=settings.delta_clamp)
    else:
        delta_range = _DELTA_RANGE[lang]["free"].format(h=settings.delta_hint)
    values = _persona_values(profile, lang)
    values.update(
        acceptance=_ACCEPTANCE[lang][settings.reserve],
        emotion=str(int(emotion)),
        history=_transcript(hist, lang, think),
        latest_reply=_visible(latest_reply, think),
        delta_range=delta_range,
    )
    return _render(f"analyzer_{lang}", **values)


def _analysis_text(analysis: AnalyzerResult | str | None, lang: str) -> str:
    # The actor gets the level, never the number: the change field is left out.
    if analysis is None:
        return ""
    raw = analysis.raw if isinstance(analysis, AnalyzerResult) else _as_text(analysis)
    found = _fields(_normalize(raw), _ANALYZER_LABEL_RE)
    if not found:
        return raw.strip()
    titles = _FIELD_TITLES[lang]
    parts = []
    for name, start, end in found:
        value = _clean_value(raw[start:end])
        if name != "delta" and name not in _LABEL_ONLY_FIELDS and value:
            parts.append(f"{titles[name]}: {value}")
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
    level_text = _LEVEL_TEXT[lang].get(level, level)
    if level in settings.goodbye_levels and history:
        level_text += "\n" + _GOODBYE_RULE[lang].format(word=goodbye_word(settings, lang))
    if history:
        task_instruction = _REPLY_TASK[lang]
    else:
        topic = getattr(profile, "topic", None)
        clause = _TOPIC_CLAUSE[lang].format(topic=topic.strip()) if topic and topic.strip() else ""
        task_instruction = load_template(f"opening_{lang}")[0].format(topic_clause=clause)
    text = _analysis_text(analysis, lang).strip()
    values = _persona_values(profile, lang)
    values.update(
        hint_rule=_HINT_RULE[lang][settings.hint_need],
        reserve_rule=_RESERVE[lang][settings.reserve],
        level_text=level_text,
        history=_transcript(history, lang, think),
        analysis_block=f"{_ANALYSIS_HEADER[lang]}{text}\n\n" if text else "",
        task_instruction=task_instruction,
        persona_rule=_PASSIVE_RULE[lang] if _personality_name(profile) == "passive" else "",
    )
    return _render(f"actor_{lang}", **values)


def render_policy_messages(
    profile: Any | None,
    history: Sequence[tuple[str, str]],
    think: bool,
    settings_or_lang: SimulatorSettings | str | None = None,
) -> list[dict[str, str]]:
    """The policy's chat: system prompt, then the dialogue as user / assistant turns.

    The profile is used only to pick the language ("auto"); the policy never sees persona,
    scene or hidden need. In think mode the system prompt asks for <think>...</think> before
    each reply and past assistant turns keep only the text after their last </think>;
    without think mode assistant turns are passed as generated.
    """
    if isinstance(settings_or_lang, SimulatorSettings):
        setting = settings_or_lang.language
    else:
        setting = settings_or_lang
    if setting in LANGUAGES:
        lang = setting
    elif profile is not None:
        lang = resolve_language(profile, "auto")
    else:
        # Nothing names the language: follow the dialogue itself.
        lang = _detect_language(" ".join(text for _, text in history))
    system = load_template(f"policy_system_{lang}")[0]
    if think:
        system = f"{system}\n\n{load_template(f'policy_think_{lang}')[0]}"
    messages = [{"role": "system", "content": system}]
    for role, text in history:
        if role not in ("user", "assistant"):
            raise ValueError(f"history role must be 'user' or 'assistant', got {role!r}")
        content = split_think(text).reply if (think and role == "assistant") else text
        messages.append({"role": role, "content": content})
    return messages


# --- parsing -----------------------------------------------------------------------------

ANALYZER_FIELDS: tuple[str, ...] = ("intent", "fit", "reaction", "feeling", "delta")
ACTOR_FIELDS: tuple[str, ...] = ("thinking", "draft", "refine", "reply")

# Titles used when the analysis is shown to the actor.
_FIELD_TITLES: dict[str, dict[str, str]] = {
    "en": {"intent": "Intent", "fit": "Fit", "reaction": "Inner reaction", "feeling": "Feeling"},
    "zh": {"intent": "意图", "fit": "契合度", "reaction": "内心反应", "feeling": "感受"},
}

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


def _as_text(text: Any) -> str:
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


@dataclasses.dataclass(frozen=True)
class ThinkSplit:
    """A policy generation split at its last </think>. `closed` is False when a <think> was
    opened and never closed (the unfinished thought is in `thought`, not in `reply`)."""

    thought: str
    reply: str
    closed: bool


def parse_analyzer(text: Any) -> AnalyzerResult:
    """Reads the five analyzer fields and the signed emotion change. Never raises.

    The change is taken from the last "emotion change" field that holds a number; failing
    that, from an inline "emotion change ... N" anywhere; failing that, from a last line that
    is just a number. Full-width punctuation, markdown, brackets, quotes, "+5", "5分" and
    decimals (rounded) are accepted; a change beyond +-MAX_PARSED_ABS_DELTA is rejected.
    """
    raw = _as_text(text)
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
        norm = _normalize(_as_text(text)).lower()
        for word in words or tuple(DEFAULT_GOODBYE_WORDS.values()):
            w = _normalize(_as_text(word)).lower().strip()
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
    raw = _as_text(text)
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


_THINK_OPEN = "<think>"
_THINK_CLOSE = "</think>"


def split_think(text: Any) -> ThinkSplit:
    """Splits a generation into thought and reply. Never raises.

    reply = the text after the LAST </think> (the whole text when there is none), stripped.
    A <think> opened after the last </think> (or with no </think> at all) is unclosed: it
    and everything after it go to `thought` and `closed` is False.
    """
    raw = _as_text(text)
    try:
        cut = raw.rfind(_THINK_CLOSE)
        if cut >= 0:
            thought = raw[:cut]
            reply = raw[cut + len(_THINK_CLOSE):]
        else:
            thought, reply = "", raw
        closed = True
        opened = reply.find(_THINK_OPEN)
        if opened >= 0:
            thought = thought + reply[opened:]
            reply = reply[:opened]
            closed = False
        # Tags become line breaks so that separate thought segments do not run together.
        thought = thought.replace(_THINK_OPEN, "\n").replace(_THINK_CLOSE, "\n").strip()
        return ThinkSplit(thought=thought, reply=reply.strip(), closed=closed)
    except Exception:
        return ThinkSplit(thought="", reply="", closed=False)
