"""Word lists and message templates of the toy `rule` judge (see rule_judge.py).

Data only: the need lexicons and the phrases each need dislikes that score a policy reply, the
common English words that tell words from token soup, and the templated user messages.
"""

from __future__ import annotations

from rlver_jax.env.profiles import OTHER_NEED

__all__ = [
    "BLAME",
    "COMMON_EN_WORDS",
    "DISMISSIVE",
    "GOODBYE_REPLIES",
    "LEVEL_REPLIES",
    "NEED_AVOID",
    "NEED_CUES",
    "NEED_LEXICONS",
    "ONE_SIDED",
    "OPENINGS",
    "OPENING_NO_GIST",
    "OPENING_TOPIC",
    "PLATITUDES",
    "WARM_WORDS",
]

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

PLATITUDES: dict[str, tuple[str, ...]] = {
    "en": ("you should just", "just relax", "don't worry", "cheer up", "it'll be fine",
           "it will be fine", "bright side", "everything happens for a reason", "move on",
           "get over it", "calm down"),
    "zh": ("别想太多", "想开点", "开心点", "别难过", "一切都会好的", "你应该", "看开点", "别哭", "冷静"),
}
BLAME: dict[str, tuple[str, ...]] = {
    "en": ("your fault", "you should have", "you were wrong", "your own fault", "you also",
           "both at fault"),
    "zh": ("你的错", "你也有责任", "你应该反思", "你也不对", "你本来就"),
}
ONE_SIDED: dict[str, tuple[str, ...]] = {
    "en": ("totally right", "completely wrong", "entirely (?:his|her|their) fault", "always"),
    "zh": ("完全是他的错", "完全是她的错", "他就是", "她就是", "绝对"),
}
DISMISSIVE: dict[str, tuple[str, ...]] = {
    "en": ("who cares", "ignore (?:him|her|them)", "forget (?:him|her|them)", "doesn't matter"),
    "zh": ("别管他", "别管她", "不用理", "无所谓"),
}
# Which phrases each need dislikes.
NEED_AVOID: dict[str, dict[str, tuple[str, ...]]] = {
    "being listened to while venting": PLATITUDES,
    "deep empathy rather than platitudes": PLATITUDES,
    "practical advice": {
        lang: tuple(p for p in PLATITUDES[lang] if p not in ("你应该", "you should just"))
        for lang in ("en", "zh")
    },
    "being told they did nothing wrong": BLAME,
    "sincere praise of specific actions": BLAME,
    "dialectical analysis": ONE_SIDED,
    "others' motives": DISMISSIVE,
    "guided self-reflection": {"en": ("you should just", "not your problem"), "zh": ("你应该", "不用想")},
    OTHER_NEED: PLATITUDES,
}

# Common English words: a reply made mostly of words outside this list and the lexicons is
# treated as garbled. Small on purpose (a toy): ordinary topic words cost a little, soup a lot.
COMMON_EN_WORDS = """
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


# --- user message templates --------------------------------------------------------------

LEVEL_REPLIES: dict[str, dict[str, tuple[str, ...]]] = {
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
GOODBYE_REPLIES: dict[str, dict[str, tuple[str, ...]]] = {
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
NEED_CUES: dict[str, dict[str, tuple[str, ...]]] = {
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
NEED_CUES[OTHER_NEED] = {"en": ("It's been weighing on me.",), "zh": ("这事一直压在我心上。",)}

OPENINGS: dict[str, tuple[str, ...]] = {
    "en": ("Hey, can I talk to you about something? {gist}", "Got a minute? {gist}",
           "Ugh, it's been a rough stretch. {gist}"),
    "zh": ("在吗？想跟你说件事。{gist}", "有空吗？{gist}", "唉，最近真的挺烦的。{gist}"),
}
OPENING_TOPIC: dict[str, str] = {
    "en": "It's about {topic}.",
    "zh": "是关于{topic}的事。",
}
OPENING_NO_GIST: dict[str, str] = {
    "en": "Something's been on my mind lately.",
    "zh": "最近心里有点乱。",
}
