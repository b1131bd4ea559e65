"""The `rule` judge: a deterministic TOY stand-in for the LLM user simulator.

THIS IS A TOY. It does not understand dialogue. It scores a policy reply against the
profile's hidden need with word lists and a few patterns, so that CPU tests and tiny smoke
runs have a fast, reproducible, learnable reward without any simulator model. Its numbers say
nothing about empathy; never report them as a Sentient / SAGE score.

Scoring of one reply (an emotion change, applied by `simulator.apply_delta` like an LLM's):

- garbled text (empty, piles of symbols, mostly non-words) -> GARBLED_DELTA, nothing else;
- + NEED_WORD_GAIN[reserve] per distinct need-specific word or phrase (up to NEED_WORD_CAP):
  simple, frequent words per need, e.g. "hear", "listen", "sounds", "tough" for being listened
  to; no hit at all -> OFF_TARGET_DELTA[reserve];
- + WARM_WORD_GAIN per generic warmth word (up to WARM_WORD_CAP);
- penalties: phrases the need dislikes ("you should just", "cheer up" for venting / empathy,
  blame for "did nothing wrong"...), many unknown words, repeated tokens, repeating an
  earlier reply, replies that are too long, the wrong language.

A tiny LM can therefore raise its reward by emitting real words from the need lexicons in a
clean short reply, while random token soup scores below such a reply. User messages are
templates chosen by level with a seeded RNG; at a goodbye level (S / F) the user says goodbye
with the goodbye word.

The word lists and the message templates are data, in rule_lexicons.py.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Sequence
from typing import Any

from rlver_jax.env.profiles import CJK_RE, HIDDEN_NEEDS, OTHER_NEED, hidden_need_category
from rlver_jax.env.rule_lexicons import (
    BLAME,
    COMMON_EN_WORDS,
    GOODBYE_REPLIES,
    LEVEL_REPLIES,
    NEED_AVOID,
    NEED_CUES,
    NEED_LEXICONS,
    OPENING_NO_GIST,
    OPENING_TOPIC,
    OPENINGS,
    PLATITUDES,
    WARM_WORDS,
)
from rlver_jax.env.simulator import (
    AnalyzerResult,
    DialogueState,
    SimulatorSettings,
    emotion_level,
    goodbye_word,
    resolve_language,
    split_think,
)

__all__ = [
    "GARBLED_DELTA",
    "NEED_LEXICONS",
    "TOY_LABEL",
    "RuleJudge",
    "need_of",
]

TOY_LABEL = "[toy rule judge]"

# --- scoring constants -------------------------------------------------------------------

NEED_WORD_GAIN: dict[str, int] = {"moderate": 4, "reserved": 4, "strict": 3}
NEED_WORD_CAP = 3
WARM_WORD_GAIN = 1
WARM_WORD_CAP = 2
OFF_TARGET_DELTA: dict[str, int] = {"moderate": -2, "reserved": -3, "strict": -4}
AVOID_PENALTY = -6
GARBLED_DELTA = -20
# Unknown-word penalty grows linearly from UNKNOWN_TOLERANCE to all words unknown.
UNKNOWN_TOLERANCE = 0.35
UNKNOWN_PENALTY_MAX = 8
GARBLED_UNKNOWN_FRACTION = 0.85
GARBLED_SYMBOL_FRACTION = 0.3
MIN_WORDS_FOR_UNKNOWN_CHECK = 3
REPEAT_MIN_TOKENS = 6
REPEAT_UNIQUE_MIN = 0.5
REPEAT_PENALTY = -6
REPEATED_TURN_PENALTY = -5
MAX_REPLY_WORDS = 80
MAX_REPLY_CHARS_ZH = 160
LENGTH_PENALTY = -4
WRONG_LANGUAGE_PENALTY = -6
# Share of CJK among letters below which a reply to a Chinese user is "not Chinese".
MIN_CJK_SHARE_ZH = 0.5
# Share of CJK among letters above which a reply to an English user is "not English".
MAX_CJK_SHARE_EN = 0.2


_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")
_LATIN_RE = re.compile(r"[A-Za-z]")
# Characters that belong in a chat message: letters, digits, CJK, spaces, usual punctuation.
_NORMAL_CHAR_RE = re.compile(
    r"[\w\s.,!?;:'\"()\-…~，。！？；：、“”‘’（）《》—]"
)
_SUFFIXES: tuple[str, ...] = ("'s", "s", "es", "ed", "d", "ing", "ly", "er")


def _lexicon_words(lexicons: Any) -> set[str]:
    words: set[str] = set()
    for entries in lexicons:
        for entry in entries:
            words.update(_WORD_RE.findall(re.sub(r"\(\?:|[()?|\\]", " ", entry)))
    return words


_KNOWN_EN: frozenset[str] = frozenset(
    set(COMMON_EN_WORDS)
    | _lexicon_words(lex["en"] for lex in NEED_LEXICONS.values())
    | _lexicon_words([WARM_WORDS["en"], PLATITUDES["en"], BLAME["en"]])
)


def _known(word: str) -> bool:
    if word in _KNOWN_EN:
        return True
    return any(word.endswith(s) and word[: -len(s)] in _KNOWN_EN for s in _SUFFIXES)


@functools.lru_cache(maxsize=None)
def _compile(entries: tuple[str, ...], lang: str) -> tuple[tuple[str, re.Pattern[str]], ...]:
    if lang == "en":
        # Whole words for word entries; punctuation entries (r"\?") match anywhere.
        return tuple(
            (e, re.compile(e if e.startswith("\\") else rf"(?<![a-z']){e}(?![a-z])"))
            for e in entries
        )
    return tuple((e, re.compile(re.escape(e))) for e in entries)


def _hits(text: str, entries: Sequence[str], lang: str) -> list[str]:
    return [name for name, pat in _compile(tuple(entries), lang) if pat.search(text)]


def need_of(profile: Any) -> str:
    """The profile's hidden need: one of profiles.HIDDEN_NEEDS, or "other"."""
    need = hidden_need_category(str(getattr(profile, "task", "") or ""))
    return need if need in HIDDEN_NEEDS else OTHER_NEED


def _stable_seed(*parts: Any) -> int:
    # Python's hash() is salted per process; a digest keeps choices identical across runs.
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little")


# A scene sentence used as the gist of a generated opening: not shorter / longer than this.
MIN_GIST_CHARS = 8
MAX_GIST_CHARS = 120
_SENTENCE_END_RE = re.compile(r"(?<=[。！？!?])|(?<=\.)\s")
_HIDDEN_MARKERS = ("隐藏主题", "hidden theme", "hidden need", "hidden goal")


def _scene_gist(scene: str) -> str:
    """The first plain sentence of the backstory (never the hidden theme at its end)."""
    for line in scene.split("\n"):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "|")):
            continue
        if any(m in stripped.lower() for m in _HIDDEN_MARKERS):
            break
        plain = re.sub(r"[*_`>]+", "", stripped).lstrip("-•· ").strip()
        if re.fullmatch(r"[^。.!?！？]{0,20}[:：]", plain):  # a bold sub-heading
            continue
        sentence = _SENTENCE_END_RE.split(plain, maxsplit=1)[0].strip()
        if len(sentence) >= MIN_GIST_CHARS:
            return sentence[:MAX_GIST_CHARS]
    return ""


class RuleJudge:
    """TOY deterministic judge and user (see the module docstring). Not an LLM, not a score."""

    def __init__(self, settings: SimulatorSettings | None = None) -> None:
        self.settings = settings or SimulatorSettings()

    # -- judging ---------------------------------------------------------------------------

    def analyze(
        self, profile: Any, history: Sequence[tuple[str, str]], reply: str
    ) -> AnalyzerResult:
        """Scores `reply` (raw policy output; thoughts are stripped) for `profile`.

        Returns an AnalyzerResult whose `raw` is in the analyzer's labelled format (so that
        `parse_analyzer(result.raw)` gives the same delta) and whose fields start with the
        TOY label.
        """
        lang = resolve_language(profile, self.settings)
        need = need_of(profile)
        text = split_think(reply if isinstance(reply, str) else "").reply
        delta, notes = self._score(text, need, lang, history)
        fields = {
            "intent": f"{TOY_LABEL} need={need}",
            "fit": "; ".join(notes["fit"]) or "no need words",
            "reaction": "; ".join(notes["penalties"]) or "no penalties",
            "feeling": "positive" if delta > 0 else ("neutral" if delta == 0 else "negative"),
            "delta": f"{delta:+d}",
        }
        raw = "\n".join(
            [
                f"Intent: {fields['intent']}",
                f"Fit: {fields['fit']}",
                f"Inner reaction: {fields['reaction']}",
                f"Feeling: {fields['feeling']}",
                f"Emotion change: {fields['delta']}",
            ]
        )
        return AnalyzerResult(delta=delta, fields=fields, ok=True, raw=raw)

    def _score(
        self, text: str, need: str, lang: str, history: Sequence[tuple[str, str]]
    ) -> tuple[int, dict[str, list[str]]]:
        notes: dict[str, list[str]] = {"fit": [], "penalties": []}
        lowered = text.lower()
        nonspace = [c for c in text if not c.isspace()]
        if not nonspace:
            notes["penalties"].append(f"empty reply ({GARBLED_DELTA:+d})")
            return GARBLED_DELTA, notes
        symbol_fraction = sum(1 for c in nonspace if not _NORMAL_CHAR_RE.match(c)) / len(nonspace)
        letters = len(_LATIN_RE.findall(text)) + len(CJK_RE.findall(text))
        words = _WORD_RE.findall(lowered)
        unknown = sum(1 for w in words if not _known(w)) / len(words) if words else 0.0
        if lang == "zh":
            # Latin words in a Chinese chat are judged like unknown words.
            cjk = len(CJK_RE.findall(text))
            unknown = 1.0 - cjk / letters if letters else 1.0
        garbled = (
            letters == 0
            or symbol_fraction > GARBLED_SYMBOL_FRACTION
            or (len(words) >= MIN_WORDS_FOR_UNKNOWN_CHECK or lang == "zh")
            and unknown > GARBLED_UNKNOWN_FRACTION
        )
        if garbled:
            notes["penalties"].append(f"garbled text ({GARBLED_DELTA:+d})")
            return GARBLED_DELTA, notes

        delta = 0
        need_hits = _hits(lowered, NEED_LEXICONS[need][lang], lang)
        if need_hits:
            gain = NEED_WORD_GAIN[self.settings.reserve] * min(len(need_hits), NEED_WORD_CAP)
            delta += gain
            notes["fit"].append(f"need words {', '.join(need_hits)} ({gain:+d})")
        else:
            off = OFF_TARGET_DELTA[self.settings.reserve]
            delta += off
            notes["fit"].append(f"off target ({off:+d})")
        warm_hits = _hits(lowered, WARM_WORDS[lang], lang)
        if warm_hits:
            gain = WARM_WORD_GAIN * min(len(warm_hits), WARM_WORD_CAP)
            delta += gain
            notes["fit"].append(f"warmth {', '.join(warm_hits)} ({gain:+d})")

        def penalize(amount: int, why: str) -> None:
            nonlocal delta
            delta += amount
            notes["penalties"].append(f"{why} ({amount:+d})")

        avoid_hits = _hits(lowered, NEED_AVOID.get(need, {}).get(lang, ()), lang)
        if avoid_hits:
            penalize(AVOID_PENALTY, f"disliked phrases {', '.join(avoid_hits)}")
        check_unknown = lang == "zh" or len(words) >= MIN_WORDS_FOR_UNKNOWN_CHECK
        if check_unknown and unknown > UNKNOWN_TOLERANCE:
            share = (unknown - UNKNOWN_TOLERANCE) / (1.0 - UNKNOWN_TOLERANCE)
            penalize(-round(UNKNOWN_PENALTY_MAX * share), f"unnatural words {unknown:.0%}")
        tokens = words if lang == "en" else [c for c in text if CJK_RE.match(c) or c.isalnum()]
        if len(tokens) >= REPEAT_MIN_TOKENS and len(set(tokens)) / len(tokens) < REPEAT_UNIQUE_MIN:
            penalize(REPEAT_PENALTY, "repetitive")
        previous = {split_think(t).reply.strip() for role, t in history if role == "assistant"}
        if text.strip() in previous:
            penalize(REPEATED_TURN_PENALTY, "repeats an earlier reply")
        if lang == "en":
            too_long = len(words) > MAX_REPLY_WORDS
        else:
            too_long = len(nonspace) > MAX_REPLY_CHARS_ZH
        if too_long:
            penalize(LENGTH_PENALTY, "too long")
        cjk_share = len(CJK_RE.findall(text)) / letters if letters else 0.0
        wrong_language = (lang == "zh" and cjk_share < MIN_CJK_SHARE_ZH) or (
            lang == "en" and cjk_share > MAX_CJK_SHARE_EN
        )
        if wrong_language:
            penalize(WRONG_LANGUAGE_PENALTY, "wrong language")
        return delta, notes

    # -- the user's messages ---------------------------------------------------------------

    def _cue(self, profile: Any, lang: str, rng: random.Random) -> str:
        if not self.settings.hint_need:
            return ""
        return rng.choice(NEED_CUES[need_of(profile)][lang])

    def user_reply(self, profile: Any, state: DialogueState, rng_seed: int) -> str:
        """A template user message for the state's level (goodbye at a goodbye level).

        Deterministic in (profile id, dialogue id, turn, rng_seed).
        """
        lang = resolve_language(profile, self.settings)
        key = ("reply", getattr(profile, "id", ""), state.dialogue_id, state.turns, rng_seed)
        rng = random.Random(_stable_seed(*key))
        level = emotion_level(state.emotion)
        if level in self.settings.goodbye_levels:
            pool = GOODBYE_REPLIES[lang]["S" if level == "S" else "F"]
            return rng.choice(pool).format(word=goodbye_word(self.settings, lang))
        text = rng.choice(LEVEL_REPLIES[lang].get(level, LEVEL_REPLIES[lang]["B"]))
        cue = self._cue(profile, lang, rng)
        sep = " " if lang == "en" else ""
        return f"{text}{sep}{cue}" if cue else text

    def opening(self, profile: Any, seed: int) -> str:
        """The first user message: `first_talk` when settings say so and it exists, else a
        template from the topic (or the first sentence of the scene's backstory)."""
        first_talk = getattr(profile, "first_talk", None)
        if self.settings.use_first_talk and first_talk and first_talk.strip():
            return first_talk
        lang = resolve_language(profile, self.settings)
        rng = random.Random(_stable_seed("opening", getattr(profile, "id", ""), seed))
        topic = getattr(profile, "topic", None)
        if topic and topic.strip():
            gist = OPENING_TOPIC[lang].format(topic=topic.strip())
        else:
            gist = _scene_gist(str(getattr(profile, "scene", "") or "")) or OPENING_NO_GIST[lang]
        text = rng.choice(OPENINGS[lang]).format(gist=gist)
        cue = self._cue(profile, lang, rng)
        sep = " " if lang == "en" else ""
        return f"{text}{sep}{cue}" if cue else text
