"""The simulated user's settings: knobs, difficulty presets, emotion levels and languages.

`settings_from_config` turns the `simulator` section of a run's config into
`SimulatorSettings`. The emotion thresholds of evaluation (SUCCESS_EMOTION, FAILURE_EMOTION)
live here too, next to the level table they belong with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from rlver_jax.env.profiles import CJK_RE, profile_language

__all__ = [
    "DEFAULT_GOODBYE_WORDS",
    "DIFFICULTY_PRESETS",
    "EMOTION_LEVELS",
    "EMOTION_MAX",
    "FAILURE_EMOTION",
    "FAIL_LEVEL",
    "LANGUAGES",
    "LANGUAGE_CHOICES",
    "RESERVE_LEVELS",
    "SUCCESS_EMOTION",
    "SimulatorSettings",
    "detect_language",
    "goodbye_word",
    "resolve_language",
    "settings_from_config",
]

EMOTION_MAX = 100
# Level thresholds, highest first: a level holds when emotion >= its threshold.
EMOTION_LEVELS: tuple[tuple[str, int], ...] = (("S", 100), ("A", 70), ("B", 40), ("C", 10))
FAIL_LEVEL = "F"  # below the last threshold
# Evaluation counts a dialogue that ends at or above SUCCESS_EMOTION a success and one that
# ends below FAILURE_EMOTION a failure (SAGE's rules; also its termination bounds).
SUCCESS_EMOTION = 100
FAILURE_EMOTION = 10

LANGUAGES: tuple[str, ...] = ("en", "zh")
# "auto" follows the profile's language (profiles.profile_language).
LANGUAGE_CHOICES: tuple[str, ...] = ("auto", *LANGUAGES)
RESERVE_LEVELS: tuple[str, ...] = ("moderate", "reserved", "strict")

DEFAULT_GOODBYE_WORDS: dict[str, str] = {"en": "Goodbye", "zh": "再见"}

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
        end_below=FAILURE_EMOTION,
        end_at_or_above=SUCCESS_EMOTION,
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



# --- language ----------------------------------------------------------------------------


def detect_language(text: str) -> str:
    """"zh" when `text` holds any CJK ideograph, else "en"."""
    return "zh" if CJK_RE.search(text or "") else "en"

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
        return profile_language(profile)
    except Exception:  # a duck-typed profile without the Profile fields
        return detect_language(f"{getattr(profile, 'player', '')}{getattr(profile, 'scene', '')}")


def goodbye_word(settings: SimulatorSettings, language: str) -> str:
    """The goodbye word in force: the configured one, else the language's default."""
    return settings.goodbye_word or DEFAULT_GOODBYE_WORDS.get(language, DEFAULT_GOODBYE_WORDS["en"])
