"""Tests of the toy `rule` judge: determinism, a learnable signal, garbage, goodbyes, EN / ZH."""

from __future__ import annotations

import dataclasses
import random

import pytest

from rlver_jax.env.profiles import HIDDEN_NEEDS, Profile
from rlver_jax.env.rule_judge import GARBLED_DELTA, NEED_LEXICONS, TOY_LABEL, RuleJudge, need_of
from rlver_jax.env.simulator import (
    DIFFICULTY_PRESETS,
    add_policy_reply,
    add_user_message,
    apply_analysis,
    contains_goodbye,
    new_dialogue,
    parse_analyzer,
)


def en_profile(need: str = "being listened to while venting", **kw) -> Profile:
    base = dict(
        id=f"en-{need[:8]}",
        player="Name: Sam Reed. Age 40. Mechanic. Talks in short bursts.",
        scene="Sam's brother sold the family garage without asking him.\n"
        f"Hidden theme: {need}",
        main_cha="negative",
        cha_group=("blunt", "loyal", "stubborn"),
        task=need,
    )
    base.update(kw)
    return Profile(**base)


ZH_VENT = Profile(
    id="zh-vent",
    player="姓名：王丽娜\n年龄：29岁\n职业：小学教师",
    scene="王丽娜和男友李明交往两年，最近开始怀疑这段感情。\n####隐藏主题:\n***你希望对方用心倾听你的情绪宣泄",
    main_cha="被动型",
    cha_group=("内向", "谦逊", "愤懑"),
    task="你希望对方用心倾听你的情绪宣泄",
    first_talk="最近有点烦。",
)
HARD = DIFFICULTY_PRESETS["hard"]
SAGE = DIFFICULTY_PRESETS["sage"]


def test_every_need_has_lexicons():
    for need in HIDDEN_NEEDS:
        assert NEED_LEXICONS[need]["en"] and NEED_LEXICONS[need]["zh"]
        assert need_of(en_profile(need)) == need
    assert need_of(ZH_VENT) == "being listened to while venting"


def test_deterministic_and_labelled_toy():
    judge = RuleJudge(HARD)
    p = en_profile()
    a = judge.analyze(p, [], "I hear you. That sounds tough.")
    b = RuleJudge(HARD).analyze(p, [], "I hear you. That sounds tough.")
    assert a == b and a.ok
    assert TOY_LABEL in a.raw and TOY_LABEL in a.fields["intent"]
    assert parse_analyzer(a.raw).delta == a.delta  # same format as an LLM analyzer


def test_need_words_beat_off_target_and_soup():
    judge = RuleJudge(HARD)
    p = en_profile()
    good = judge.analyze(p, [], "I hear you. That sounds really tough, I'm listening.").delta
    plain = judge.analyze(p, [], "The weather is nice today.").delta
    assert good > 0 > plain
    # Random soup of sentencepiece-like fragments, some of them need words.
    frags = "the ing ough hear ed s to you a er an tion re in ly sound tough it is list en".split()
    rng = random.Random(0)
    soups = [
        " ".join(rng.choice(frags) + rng.choice(["", *frags]) for _ in range(10))
        for _ in range(200)
    ]
    soup_scores = [judge.analyze(p, [], s).delta for s in soups]
    assert max(soup_scores) < good
    assert sum(soup_scores) / len(soup_scores) < plain
    # Variance among soups: the gradient a tiny LM learns from.
    assert len(set(soup_scores)) > 3


@pytest.mark.parametrize("need", HIDDEN_NEEDS)
def test_each_need_rewards_its_own_words(need):
    judge = RuleJudge(HARD)
    p = en_profile(need)
    words = [w.replace("?", "").replace("\\", "").replace("(?:", "").replace(")", "")
             for w in NEED_LEXICONS[need]["en"][:3]]
    reply = "Okay, " + ", ".join(w.split("|")[0] for w in words) + "."
    own = judge.analyze(p, [], reply).delta
    assert own > judge.analyze(p, [], "Okay, that is a thing.").delta


def test_platitudes_penalised_for_venting_and_empathy():
    judge = RuleJudge(HARD)
    for need in ("being listened to while venting", "deep empathy rather than platitudes"):
        p = en_profile(need)
        assert judge.analyze(p, [], "Cheer up, you should just move on.").delta < (
            judge.analyze(p, [], "Okay, that is a thing.").delta
        )
    blame = en_profile("being told they did nothing wrong")
    assert judge.analyze(blame, [], "Honestly it was your fault.").delta < 0


@pytest.mark.parametrize(
    "reply", ["", "   ", "@@@ ### $$$ %%% !!!", "xqz blorp fwip zzkt vvrr", "🙂🙂🙂🙂🙂🙂"]
)
def test_garbled_is_very_negative(reply):
    assert RuleJudge(HARD).analyze(en_profile(), [], reply).delta == GARBLED_DELTA
    assert GARBLED_DELTA <= -15


def test_repetition_and_length_penalties():
    judge = RuleJudge(HARD)
    p = en_profile()
    once = judge.analyze(p, [], "I hear you.").delta
    assert judge.analyze(p, [], "hear " * 12).delta < once
    history = [("user", "ugh"), ("assistant", "I hear you.")]
    assert judge.analyze(p, history, "I hear you.").delta < once
    long = "I hear you. " + "That is a lot of things to think about today. " * 12
    assert judge.analyze(p, [], long).delta < once


def test_thoughts_are_not_scored():
    judge = RuleJudge(HARD)
    p = en_profile()
    hidden = judge.analyze(p, [], "<think>hear listen sounds tough</think>The weather is nice.")
    assert hidden.delta == judge.analyze(p, [], "The weather is nice.").delta


def test_chinese_scoring():
    judge = RuleJudge(HARD)
    good = judge.analyze(ZH_VENT, [], "嗯，我在听，你慢慢说，真的辛苦了。").delta
    assert good > 0
    assert judge.analyze(ZH_VENT, [], "你应该想开点").delta < 0
    assert judge.analyze(ZH_VENT, [], "！！！@@@###").delta == GARBLED_DELTA
    assert judge.analyze(ZH_VENT, [], "hello there my friend").delta < good


def test_user_reply_goodbye_at_s_and_f_and_determinism():
    ciao = dataclasses.replace(HARD, goodbye_word="Ciao")
    for settings, lang_word in ((HARD, "Goodbye"), (ciao, "Ciao")):
        judge = RuleJudge(settings)
        p = en_profile()
        state = new_dialogue("d1", p, settings)
        for emotion in (100, 5):
            state.emotion = emotion
            reply = judge.user_reply(p, state, rng_seed=3)
            assert lang_word in reply and contains_goodbye(reply, [lang_word])
        state.emotion = 50
        mid = judge.user_reply(p, state, rng_seed=3)
        assert not contains_goodbye(mid, [lang_word])
        assert mid == judge.user_reply(p, state, rng_seed=3)
    zh = RuleJudge(HARD)
    state = new_dialogue("z", ZH_VENT, HARD)
    state.emotion = 0
    assert "再见" in zh.user_reply(ZH_VENT, state, 0)
    seen = {RuleJudge(HARD).user_reply(en_profile(), dataclasses.replace(state, emotion=50), s)
            for s in range(20)}
    assert len(seen) > 1  # the seed matters


def test_hints_follow_settings():
    p = en_profile("practical advice")
    state = new_dialogue("h", p, SAGE)
    state.emotion = 50
    hinted = {RuleJudge(SAGE).user_reply(p, state, s) for s in range(10)}
    plain = {RuleJudge(HARD).user_reply(p, state, s) for s in range(10)}
    assert any("what to do next" in r for r in hinted)
    assert not any("what to do next" in r for r in plain)


def test_opening():
    p = en_profile(first_talk="Can't believe my brother did this.", topic=None)
    assert RuleJudge(SAGE).opening(p, 0) == p.first_talk  # evaluation: fixed first message
    gen = RuleJudge(HARD).opening(p, 0)
    assert gen != p.first_talk and "garage" in gen and "Hidden" not in gen
    assert gen == RuleJudge(HARD).opening(p, 0)
    with_topic = RuleJudge(HARD).opening(dataclasses.replace(p, topic="the family garage"), 1)
    assert "the family garage" in with_topic
    zh = RuleJudge(HARD).opening(ZH_VENT, 0)
    assert "王丽娜" in zh and "隐藏" not in zh and "倾听" not in zh


def test_rule_judge_drives_a_dialogue():
    """The pieces compose: a listening policy ends high, a bad one ends low."""
    def run(policy_reply: str) -> tuple[int, str]:
        judge = RuleJudge(HARD)
        p = en_profile()
        state = new_dialogue("run", p, HARD)
        add_user_message(state, judge.opening(p, 0), HARD)
        while not state.done:
            add_policy_reply(state, policy_reply)
            result = judge.analyze(p, state.history[:-1], policy_reply)
            if apply_analysis(state, result.delta, HARD, raw_delta=result.delta,
                              analyzer_text=result.raw):
                break
            add_user_message(state, judge.user_reply(p, state, state.turns), HARD)
        return state.emotion, state.done_reason

    good_emotion, _ = run("I hear you, that sounds tough. Tell me more, I'm listening.")
    bad_emotion, reason = run("asdf qwer zxcv !!!")
    assert good_emotion > 30 > bad_emotion and reason == "emotion_low"
