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
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
from collections.abc import Sequence
from typing import Any

from rlver_jax.env.profiles import HIDDEN_NEEDS, OTHER_NEED, hidden_need_category
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

# --- lexicons ----------------------------------------------------------------------------
# English entries are regex fragments matched as whole words on lower-cased text; Chinese
# entries are substrings. Each distinct entry counts once per reply.

NEED_LEXICONS: dict[str, dict[str, tuple[str, ...]]] = {
    "dialectical analysis": {
        "en": ("on one hand", "other hand", "both", "however", "but also", "sides?", "balance",
               "at the same time", "fair to say", "complicated"),
        "zh": ("一方面", "另一方面", "同时", "两面", "辩证", "但是", "不过", "客观", "换个角度"),
    },
    "practical advice": {
        "en": ("try", "step", "plan", "first", "could", "suggest", "options?", "tips?",
               "how about", "next"),
        "zh": ("建议", "试试", "第一步", "计划", "方法", "先", "沟通", "可以", "下一步"),
    },
    "others' motives": {
        "en": ("maybe", "perhaps", "because", "reasons?", "might", "perspective", "pressure",
               "from (?:his|her|their) side", "afraid", "probably"),
        "zh": ("可能", "也许", "原因", "因为", "角度", "压力", "担心", "出于", "或许"),
    },
    "guided self-reflection": {
        "en": ("what do you think", "why", "notice", "learn", "reflect", "grow", "wonder",
               "what if", "looking back", r"\?"),
        "zh": ("你觉得", "为什么", "想一想", "反思", "成长", "学到", "?", "？", "回头看"),
    },
    "sincere praise of specific actions": {
        "en": ("proud", "well done", "great job", "brave", "impressive", "you handled",
               "strong", "amazing", "admire", "good call"),
        "zh": ("真棒", "厉害", "做得好", "了不起", "勇敢", "佩服", "骄傲", "很棒", "不容易"),
    },
    "being listened to while venting": {
        "en": ("hear", "listen(?:ing)?", "sounds", "tough", "tell me", "go on", "i'm here",
               "vent", "let it out", "all ears"),
        "zh": ("我在听", "听你说", "说出来", "辛苦", "难受", "我在", "慢慢说", "嗯", "听着"),
    },
    "deep empathy rather than platitudes": {
        "en": ("feel", "hurt", "painful", "must be", "lonely", "heavy", "exhausting",
               "makes sense you", "of course you", "so hard"),
        "zh": ("感受", "一定很", "心疼", "委屈", "孤独", "难过", "痛苦", "懂你", "换作是我"),
    },
    "being told they did nothing wrong": {
        "en": ("not your fault", "nothing wrong", "right", "fair", "unfair", "reasonable",
               "makes sense", "justified", "on your side", "did well"),
        "zh": ("不是你的错", "没有错", "你没错", "合理", "正常", "不公平", "站在你这边", "没做错", "应该的"),
    },
}
# Profiles whose need is not one of the eight get the listening and empathy words.
NEED_LEXICONS[OTHER_NEED] = {
    lang: NEED_LEXICONS["being listened to while venting"][lang]
    + NEED_LEXICONS["deep empathy rather than platitudes"][lang]
    for lang in ("en", "zh")
}

WARM_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("sorry", "care", "friend", "glad", "hug", "together", "thanks?", "with you"),
    "zh": ("抱抱", "朋友", "陪你", "关心", "谢谢", "一起", "别担心"),
}

_PLATITUDES: dict[str, tuple[str, ...]] = {
    "en": ("you should just", "just relax", "don't worry", "cheer up", "it'll be fine",
           "it will be fine", "bright side", "everything happens for a reason", "move on",
           "get over it", "calm down"),
    "zh": ("别想太多", "想开点", "开心点", "别难过", "一切都会好的", "你应该", "看开点", "别哭", "冷静"),
}
_BLAME: dict[str, tuple[str, ...]] = {
    "en": ("your fault", "you should have", "you were wrong", "your own fault", "you also",
           "both at fault"),
    "zh": ("你的错", "你也有责任", "你应该反思", "你也不对", "你本来就"),
}
_ONE_SIDED: dict[str, tuple[str, ...]] = {
    "en": ("totally right", "completely wrong", "entirely (?:his|her|their) fault", "always"),
    "zh": ("完全是他的错", "完全是她的错", "他就是", "她就是", "绝对"),
}
_DISMISSIVE: dict[str, tuple[str, ...]] = {
    "en": ("who cares", "ignore (?:him|her|them)", "forget (?:him|her|them)", "doesn't matter"),
    "zh": ("别管他", "别管她", "不用理", "无所谓"),
}
# Which phrases each need dislikes.
NEED_AVOID: dict[str, dict[str, tuple[str, ...]]] = {
    "being listened to while venting": _PLATITUDES,
    "deep empathy rather than platitudes": _PLATITUDES,
    "practical advice": {
        lang: tuple(p for p in _PLATITUDES[lang] if p not in ("你应该", "you should just"))
        for lang in ("en", "zh")
    },
    "being told they did nothing wrong": _BLAME,
    "sincere praise of specific actions": _BLAME,
    "dialectical analysis": _ONE_SIDED,
    "others' motives": _DISMISSIVE,
    "guided self-reflection": {"en": ("you should just", "not your problem"), "zh": ("你应该", "不用想")},
    OTHER_NEED: _PLATITUDES,
}

# Common English words: a reply made mostly of words outside this list and the lexicons is
# treated as garbled. Small on purpose (a toy): ordinary topic words cost a little, soup a lot.
_COMMON_EN = """
a about above after again against all almost alone along already also although always am an
and another any anyone anything are aren't around as ask at away back bad be because been before
being believe best better between big bit both but by can can't care cause change could couldn't
day days did didn't do does doesn't doing don't done down during each easy else enough even ever
every everyone everything exactly family far feel feeling feelings felt few find fine for friend
friends from get gets getting give go goes going gone good got great had hard has have haven't
having he he's her here hers him his hold home honestly hope how i i'd i'll i'm i've if in inside
into is isn't it it's its job just keep kind know last later least left less let let's life
like little long look lot lots love made make makes many matter may me mean means mind more most
much must my myself need needs never new next nice no not nothing now of off oh ok okay old on
once one only or other others our out over own part people person place really right said same
say saying see seem seems she she's should shouldn't since so some someone something sometimes
soon still stop such sure take talk talking tell than thank thanks that that's the their them
then there there's these they they're thing things think this those though thought through time
to today together told too took tried true truly trying understand until up us very want wanted
wants was wasn't way we we're well were what what's when where which while who whole why will
with without won't work worth would wouldn't wow yeah yes yet you you'd you'll you're you've
your yours yourself hey hi hmm um sad happy angry upset worried scared tired day week month year
work school boss mom dad partner sister brother friend kids home money time talk moment feelings
""".split()

_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")
_CJK_RE = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
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
    set(_COMMON_EN)
    | _lexicon_words(lex["en"] for lex in NEED_LEXICONS.values())
    | _lexicon_words([WARM_WORDS["en"], _PLATITUDES["en"], _BLAME["en"]])
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


# --- user message templates --------------------------------------------------------------

_LEVEL_REPLIES: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "A": ("Yeah... that actually helps.", "Thanks, I think I needed that.",
              "Okay, that makes me feel a bit lighter.", "Hm, you get it more than most people."),
        "B": ("I don't know, maybe.", "Yeah, I guess.", "It's just a lot right now.",
              "Hmm. Still kind of stuck on it."),
        "C": ("That's not really it.", "Whatever.", "I don't think you get it.",
              "Yeah, sure. Anyway."),
    },
    "zh": {
        "A": ("嗯……这样说我好受一点了。", "谢谢你，我可能就是需要听到这个。", "好像轻松了一些。",
              "你比大多数人都懂我。"),
        "B": ("我也不知道，可能吧。", "嗯，也许吧。", "最近事情太多了。", "我还是有点过不去。"),
        "C": ("不是这个意思。", "算了。", "你好像不太明白。", "嗯，随便吧。"),
    },
}
_GOODBYES: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "S": ("Thank you, really. I feel so much better. {word}!",
              "This helped a lot, thanks. {word} for now!"),
        "F": ("Forget it, I'm done talking. {word}.", "This isn't helping. {word}."),
    },
    "zh": {
        "S": ("真的谢谢你，我好多了。{word}！", "和你聊完心里舒服多了，{word}！"),
        "F": ("算了，不想聊了，{word}。", "这样聊下去没什么用，{word}。"),
    },
}
# Cue sentences a user may drop when hints are allowed (hint_need); they point at the need
# without stating it, and carry words a policy can pick up.
_NEED_CUES: dict[str, dict[str, tuple[str, ...]]] = {
    "dialectical analysis": {"en": ("I keep going back and forth on who's right.",),
                             "zh": ("我总在想到底谁对谁错。",)},
    "practical advice": {"en": ("I just don't know what to do next.",),
                         "zh": ("我真不知道下一步该怎么办。",)},
    "others' motives": {"en": ("I can't figure out why they'd act like that.",),
                        "zh": ("我想不通他为什么会那样做。",)},
    "guided self-reflection": {"en": ("Maybe there's something I keep missing about myself.",),
                               "zh": ("也许我自己身上也有什么没看清的。",)},
    "sincere praise of specific actions": {"en": ("I did try really hard, you know.",),
                                           "zh": ("我其实真的很努力了。",)},
    "being listened to while venting": {"en": ("I just need to get this off my chest.",),
                                        "zh": ("我就是想把心里的话说出来。",)},
    "deep empathy rather than platitudes": {"en": ("People keep telling me it'll be fine.",),
                                            "zh": ("别人总跟我说没事的。",)},
    "being told they did nothing wrong": {"en": ("Everyone acts like it's on me.",),
                                          "zh": ("大家好像都觉得是我的问题。",)},
}
_NEED_CUES[OTHER_NEED] = {"en": ("It's been weighing on me.",), "zh": ("这事一直压在我心上。",)}

_OPENINGS: dict[str, tuple[str, ...]] = {
    "en": ("Hey, can I talk to you about something? {gist}", "Got a minute? {gist}",
           "Ugh, it's been a rough stretch. {gist}"),
    "zh": ("在吗？想跟你说件事。{gist}", "有空吗？{gist}", "唉，最近真的挺烦的。{gist}"),
}
_OPENING_TOPIC: dict[str, str] = {
    "en": "It's about {topic}.",
    "zh": "是关于{topic}的事。",
}
_OPENING_NO_GIST: dict[str, str] = {
    "en": "Something's been on my mind lately.",
    "zh": "最近心里有点乱。",
}
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
        letters = len(_LATIN_RE.findall(text)) + len(_CJK_RE.findall(text))
        words = _WORD_RE.findall(lowered)
        unknown = sum(1 for w in words if not _known(w)) / len(words) if words else 0.0
        if lang == "zh":
            # Latin words in a Chinese chat are judged like unknown words.
            cjk = len(_CJK_RE.findall(text))
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
        tokens = words if lang == "en" else [c for c in text if _CJK_RE.match(c) or c.isalnum()]
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
        cjk_share = len(_CJK_RE.findall(text)) / letters if letters else 0.0
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
        return rng.choice(_NEED_CUES[need_of(profile)][lang])

    def user_reply(self, profile: Any, state: DialogueState, rng_seed: int) -> str:
        """A template user message for the state's level (goodbye at a goodbye level).

        Deterministic in (profile id, dialogue id, turn, rng_seed).
        """
        lang = resolve_language(profile, self.settings)
        key = ("reply", getattr(profile, "id", ""), state.dialogue_id, state.turns, rng_seed)
        rng = random.Random(_stable_seed(*key))
        level = emotion_level(state.emotion)
        if level in self.settings.goodbye_levels:
            pool = _GOODBYES[lang]["S" if level == "S" else "F"]
            return rng.choice(pool).format(word=goodbye_word(self.settings, lang))
        text = rng.choice(_LEVEL_REPLIES[lang].get(level, _LEVEL_REPLIES[lang]["B"]))
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
            gist = _OPENING_TOPIC[lang].format(topic=topic.strip())
        else:
            gist = _scene_gist(str(getattr(profile, "scene", "") or "")) or _OPENING_NO_GIST[lang]
        text = rng.choice(_OPENINGS[lang]).format(gist=gist)
        cue = self._cue(profile, lang, rng)
        sep = " " if lang == "en" else ""
        return f"{text}{sep}{cue}" if cue else text
