"""Tests of the simulated user's pure-Python parts: settings, emotion state, prompts, parsing."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rlver_jax.env import simulator as sim
from rlver_jax.env.profiles import Profile
from rlver_jax.env.simulator import (
    DIFFICULTY_PRESETS,
    ActorResult,
    AnalyzerResult,
    add_policy_reply,
    add_user_message,
    apply_analysis,
    apply_delta,
    decide_retry,
    emotion_level,
    new_dialogue,
    parse_actor,
    parse_analyzer,
    render_actor_prompt,
    render_analyzer_prompt,
    render_policy_messages,
    reward,
    settings_from_config,
    split_think,
    termination_reason,
)


EN_PROFILE = Profile(
    id="en-1",
    player="Name: Maya Lin. Age 31. Nurse. Speaks briefly and dryly.",
    scene="Maya's manager took credit for her project in front of the whole ward. "
    "Hidden theme: MAYA_WANTS_TO_VENT_AND_BE_HEARD",
    main_cha="passive",
    cha_group=("reserved", "proud", "tired"),
    task="MAYA_WANTS_TO_VENT_AND_BE_HEARD",
    first_talk="Long shift. Don't even ask.",
    topic="credit stolen at work",
)
ZH_PROFILE = Profile(
    id="zh-1",
    player="姓名：王丽娜\n年龄：29岁\n职业：小学教师",
    scene="王丽娜和男友李明交往两年，最近开始怀疑这段感情。\n####隐藏主题:\n***你希望对方用心倾听你的情绪宣泄",
    main_cha="负面型",
    cha_group=("内向", "谦逊", "愤懑"),
    task="你希望对方用心倾听你的情绪宣泄",
    first_talk="最近有点烦。",
)
HARD = DIFFICULTY_PRESETS["hard"]
SAGE = DIFFICULTY_PRESETS["sage"]
STRICT = DIFFICULTY_PRESETS["strict"]


def _all_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)


# --- settings ----------------------------------------------------------------------------


def test_presets_match_rlver_md():
    assert (SAGE.start_emotion, SAGE.delta_clamp, SAGE.max_turns) == (40, 10, 10)
    assert (SAGE.end_below, SAGE.end_at_or_above, SAGE.hint_need, SAGE.use_first_talk) == (
        10, 100, True, True)
    assert (HARD.start_emotion, HARD.delta_clamp, HARD.max_turns) == (30, None, 8)
    assert (HARD.end_below, HARD.end_at_or_above, HARD.hint_need, HARD.use_first_talk) == (
        1, None, False, False)
    assert dataclasses.replace(STRICT, reserve=HARD.reserve) == HARD
    assert STRICT.reserve == "strict" and HARD.reserve != "strict"


def test_settings_from_config_overrides_and_errors():
    s = settings_from_config({"preset": "sage", "max_turns": 4, "goodbye_levels": ["F"]})
    assert s.max_turns == 4 and s.start_emotion == 40 and s.goodbye_levels == ("F",)
    assert settings_from_config({}) == HARD
    assert settings_from_config(None) == HARD
    with pytest.raises(ValueError, match="max_turn"):
        settings_from_config({"preset": "hard", "max_turn": 3})
    with pytest.raises(ValueError, match="nightmare"):
        settings_from_config({"preset": "nightmare"})
    with pytest.raises(ValueError, match="reserve"):
        settings_from_config({"reserve": "shy"})


def test_settings_from_configdict():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict({"preset": "strict", "start_emotion": 50})
    s = settings_from_config(cfg)
    assert s.reserve == "strict" and s.start_emotion == 50


# --- emotion state -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "emotion,level",
    [(100, "S"), (150, "S"), (99, "A"), (70, "A"), (69, "B"), (40, "B"), (39, "C"), (10, "C"),
     (9, "F"), (0, "F"), (-5, "F")],
)
def test_emotion_level_boundaries(emotion, level):
    assert emotion_level(emotion) == level


def test_apply_delta_clamp_cap_and_floor():
    assert apply_delta(40, 25, SAGE) == 50  # clamped to +10
    assert apply_delta(40, -25, SAGE) == 30  # clamped to -10
    assert apply_delta(40, 25, HARD) == 65  # unclamped
    assert apply_delta(95, 30, HARD) == 100  # min(e + d, 100)
    assert apply_delta(5, -30, HARD) == 0  # floor
    unbounded = dataclasses.replace(HARD, emotion_floor=None)
    assert apply_delta(5, -30, unbounded) == -25
    state = new_dialogue("d", EN_PROFILE, SAGE)
    assert apply_delta(state, 3, SAGE) == 43 and state.emotion == 40  # pure


@pytest.mark.parametrize("e,r", [(-20, 0.0), (0, 0.0), (37, 0.37), (100, 1.0), (130, 1.0)])
def test_reward_clip(e, r):
    assert reward(e) == pytest.approx(r)


def test_termination_per_preset():
    # hard: ends at emotion <= 0, never on high emotion, 8 turns
    assert termination_reason(0, 1, HARD) == "emotion_low"
    assert termination_reason(1, 1, HARD) is None
    assert termination_reason(100, 1, HARD) is None
    assert termination_reason(50, 8, HARD) == "turn_limit"
    assert termination_reason(50, 7, HARD) is None
    assert termination_reason(50, 3, HARD, goodbye=True) == "goodbye"
    # sage: ends below 10 or at 100, 10 turns
    assert termination_reason(9, 1, SAGE) == "emotion_low"
    assert termination_reason(10, 1, SAGE) is None
    assert termination_reason(100, 1, SAGE) == "emotion_high"
    assert termination_reason(50, 10, SAGE) == "turn_limit"
    assert termination_reason(50, 9, SAGE) is None
    # strict behaves like hard
    assert termination_reason(0, 1, STRICT) == "emotion_low"
    assert termination_reason(50, 8, STRICT) == "turn_limit"
    # emotion outranks the turn limit
    assert termination_reason(5, 10, SAGE) == "emotion_low"


def test_dialogue_state_flow_and_records():
    state = new_dialogue(7, EN_PROFILE, SAGE)
    assert state.dialogue_id == "7" and state.emotion == 40
    add_user_message(state, "Goodbye to my old job, I guess.", SAGE)  # opening never ends
    assert not state.done
    add_policy_reply(state, "<think>hm</think>That sounds hard.")
    assert apply_analysis(state, 25, SAGE, raw_delta=25, analyzer_text="x") is None
    rec = state.records[-1]
    assert (rec.emotion_before, rec.emotion_after, rec.delta, rec.raw_delta) == (40, 50, 10, 25)
    assert add_user_message(state, "Yeah. Goodbye!", SAGE) == "goodbye"
    assert state.done and state.done_reason == "goodbye"
    assert state.records[-1].user_reply == "Yeah. Goodbye!"
    with pytest.raises(ValueError):
        add_policy_reply(state, "more")


def test_dialogue_ends_on_turn_limit_and_emotion():
    s = dataclasses.replace(HARD, max_turns=2)
    state = new_dialogue("a", EN_PROFILE, s)
    add_user_message(state, "hi", s)
    for _ in range(2):
        add_policy_reply(state, "hey")
        reason = apply_analysis(state, 1, s)
    assert reason == "turn_limit" and state.turns == 2
    state = new_dialogue("b", EN_PROFILE, HARD)
    add_policy_reply(state, "hey")
    assert apply_analysis(state, -45, HARD) == "emotion_low" and state.emotion == 0
    assert state.reward == 0.0


def test_zh_goodbye_false_friend():
    state = new_dialogue("z", ZH_PROFILE, HARD)
    add_user_message(state, "最近有点烦。", HARD)
    add_policy_reply(state, "怎么了？")
    apply_analysis(state, 1, HARD)
    assert add_user_message(state, "我再也不想再见到他了。", HARD) is None
    add_policy_reply(state, "嗯")
    apply_analysis(state, 1, HARD)
    assert add_user_message(state, "算了，再见。", HARD) == "goodbye"


# --- retry policy ------------------------------------------------------------------------


def test_decide_retry():
    bad = AnalyzerResult(delta=None, fields={}, ok=False)
    good = AnalyzerResult(delta=4, fields={}, ok=True)
    s = dataclasses.replace(HARD, parse_retries=2, fallback_delta=0)
    assert decide_retry([], s).action == "retry"
    assert decide_retry([bad], s).action == "retry"
    d = decide_retry([bad, good], s)
    assert (d.action, d.delta, d.failures) == ("accept", 4, 1)
    d = decide_retry([bad, bad, bad], s)
    assert (d.action, d.delta, d.failures) == ("fallback", 0, 3)
    no_retry = dataclasses.replace(s, parse_retries=0, fallback_delta=-1)
    assert decide_retry([bad], no_retry).delta == -1
    abad = ActorResult(reply="meh", ok=False, goodbye=False)
    anone = ActorResult(reply=None, ok=False, goodbye=False)
    d = decide_retry([abad, anone, anone], s)
    assert (d.action, d.reply) == ("fallback", "meh")
    d = decide_retry([anone] * 3, s, language="zh")
    assert d.reply == sim.FALLBACK_USER_REPLY["zh"]
    agood = ActorResult(reply="fine", ok=True, goodbye=False)
    assert decide_retry([agood], s).reply == "fine"


# --- rendering ---------------------------------------------------------------------------


@pytest.mark.parametrize("think", [False, True])
@pytest.mark.parametrize("profile", [EN_PROFILE, ZH_PROFILE, None])
def test_policy_prompt_never_sees_scene_or_task(profile, think):
    history = [("user", "hi"), ("assistant", "<think>secret plan</think>hey"), ("user", "so...")]
    for lang in (HARD, "en", "zh", None):
        msgs = render_policy_messages(profile, history, think, lang)
        text = _all_text(msgs)
        for p in (EN_PROFILE, ZH_PROFILE):
            assert p.scene not in text and p.task not in text and p.player not in text
            assert "MAYA_WANTS" not in text and "隐藏主题" not in text
        assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]


def test_policy_think_strips_old_thoughts():
    history = [("user", "hi"), ("assistant", "<think>secret plan</think>hey there")]
    think = render_policy_messages(EN_PROFILE, history, True, HARD)
    plain = render_policy_messages(EN_PROFILE, history, False, HARD)
    assert think[2]["content"] == "hey there" and "secret" not in _all_text(think)
    assert "<think>" in think[0]["content"] and "<think>" not in plain[0]["content"]
    assert plain[2]["content"] == history[1][1]
    zh = render_policy_messages(ZH_PROFILE, [("user", "你好")], False, HARD)
    assert zh[0]["content"] != plain[0]["content"]
    with pytest.raises(ValueError):
        render_policy_messages(None, [("system", "x")], False, "en")


def test_analyzer_prompt_contents_and_current_emotion():
    state = new_dialogue("d", EN_PROFILE, HARD)
    add_user_message(state, "Long shift.", HARD)
    add_policy_reply(state, "<think>PRIVATE</think>Rough day?")
    apply_analysis(state, 17, HARD)
    msgs = render_analyzer_prompt(
        EN_PROFILE, state.history[:-1], state.history[-1][1], state.emotion, HARD
    )
    assert [m["role"] for m in msgs] == ["system", "user"]
    text = _all_text(msgs)
    assert EN_PROFILE.player in text and EN_PROFILE.scene in text and EN_PROFILE.task in text
    assert "currently 47" in text and "currently 30" not in text  # current, not initial
    assert "Rough day?" in text and "PRIVATE" not in text
    assert text.count("Rough day?") == 1
    # the same call with the latest reply still in history shows it once
    again = _all_text(render_analyzer_prompt(EN_PROFILE, state.history, "Rough day?", 47, HARD))
    assert again.count("Rough day?") == 1
    assert "garbled" in text and "Emotion change:" in text


def test_analyzer_prompt_knobs_change_text():
    base = _all_text(render_analyzer_prompt(EN_PROFILE, [], "hi", 30, HARD))
    strict = _all_text(render_analyzer_prompt(EN_PROFILE, [], "hi", 30, STRICT))
    sage = _all_text(render_analyzer_prompt(EN_PROFILE, [], "hi", 30, SAGE))
    assert base != strict and "-10 and +10" in sage and "-10 and +10" not in base
    zh = _all_text(render_analyzer_prompt(ZH_PROFILE, [], "你好", 30, HARD))
    assert "当前的情绪值是 30" in zh and ZH_PROFILE.scene in zh


def test_actor_prompt_level_goodbye_hint_reserve():
    history = [("user", "hi"), ("assistant", "hey")]
    analysis = parse_analyzer("Intent: greet\nFit: low\nInner reaction: meh\nFeeling: flat\n"
                              "Emotion change: -37")
    msgs = render_actor_prompt(EN_PROFILE, history, analysis, "B", HARD)
    text = _all_text(msgs)
    assert EN_PROFILE.scene in text and "Level B" in text
    assert "-37" not in text and "meh" in text  # analysis shown, number hidden
    assert "Goodbye" not in text
    assert "do not ask questions" in text  # passive persona
    for level in ("S", "F"):
        bye = _all_text(render_actor_prompt(EN_PROFILE, history, analysis, level, HARD))
        assert '"Goodbye"' in bye
    custom = dataclasses.replace(HARD, goodbye_word="Ciao")
    assert '"Ciao"' in _all_text(render_actor_prompt(EN_PROFILE, history, None, "F", custom))
    hint = _all_text(render_actor_prompt(EN_PROFILE, history, None, "B", SAGE))
    assert hint != _all_text(render_actor_prompt(EN_PROFILE, history, None, "B", HARD))
    assert "may drop small hints" in hint and "Never reveal or hint" in text
    strict = _all_text(render_actor_prompt(EN_PROFILE, history, None, "B", STRICT))
    assert "very guarded" in strict and "very guarded" not in text
    zh = _all_text(render_actor_prompt(ZH_PROFILE, history, None, "F", HARD))
    assert "再见" in zh and "不要提问" not in zh  # negative type, not passive


def test_actor_prompt_opening():
    msgs = render_actor_prompt(EN_PROFILE, [], None, emotion_level(30), HARD)
    text = _all_text(msgs)
    assert "has not started yet" in text and "credit stolen at work" in text
    assert "Goodbye" not in text
    zh = _all_text(render_actor_prompt(ZH_PROFILE, [], None, "C", HARD))
    assert "聊天还没有开始" in zh


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize("profile", [EN_PROFILE, ZH_PROFILE])
def test_prompts_put_static_head_first_then_transcript_then_turn_tail(profile):
    """Laid out for KV-cache reuse: the system message depends only on the profile and the
    settings, and the next turn's prompt repeats this turn's up to the end of its
    transcript (what changes every turn comes after it)."""
    history = [("user", "first words"), ("assistant", "a kind reply")]
    later = history + [("user", "second words"), ("assistant", "another reply")]
    analysis = "Intent: x\nFit: y\nInner reaction: z\nFeeling: w\nEmotion change: +3"
    renders = {
        "analyzer": (render_analyzer_prompt(profile, history, "NEWEST-A", 63, HARD),
                     render_analyzer_prompt(profile, later, "NEWEST-B", 77, HARD)),
        "actor": (render_actor_prompt(profile, history, analysis, "C", HARD),
                  render_actor_prompt(profile, later, None, "A", HARD)),
    }
    for name, (now, after) in renders.items():
        assert now[0] == after[0], name  # the static head does not move
        head = now[0]["content"]
        for per_turn in ("NEWEST", "63", "77", "Level", "级", "first words", "kind reply"):
            assert per_turn not in head, (name, per_turn)
        user_now, user_after = now[1]["content"], after[1]["content"]
        shared = _common_prefix_len(user_now, user_after)
        end_of_transcript = user_now.index("a kind reply") + len("a kind reply")
        assert shared >= end_of_transcript, name
        # the per-turn tail follows the transcript
        tail_marker = "NEWEST-A" if name == "analyzer" else ("Level C" if profile is EN_PROFILE
                                                               else "C 级")
        assert user_now.index(tail_marker) > end_of_transcript, name


def test_templates_fill_every_placeholder():
    for profile in (EN_PROFILE, ZH_PROFILE):
        for s in DIFFICULTY_PRESETS.values():
            for msgs in (
                render_analyzer_prompt(profile, [("user", "a")], "b", 30, s),
                render_actor_prompt(profile, [("user", "a")], "x", "A", s),
                render_actor_prompt(profile, [], None, "C", s),
                render_policy_messages(profile, [("user", "a")], True, s),
            ):
                text = _all_text(msgs)
                assert "{" not in text and "}" not in text and "<<<USER>>>" not in text


def test_knob_tables_cover_every_setting_and_keep_spaces():
    from rlver_jax.env import templates

    tables = {lang: templates._knob_table(lang) for lang in sim.LANGUAGES}
    assert tables["en"].keys() == tables["zh"].keys()
    for lang in sim.LANGUAGES:
        for reserve in sim.RESERVE_LEVELS:
            assert templates.knob_text(lang, f"acceptance.{reserve}")
            assert templates.knob_text(lang, f"reserve.{reserve}")
        for level in [name for name, _ in sim.EMOTION_LEVELS] + [sim.FAIL_LEVEL]:
            assert level in templates.knob_text(lang, f"level.{level}")
    # Spaces at either end of an entry are part of it.
    assert templates.knob_text("en", "trait_separator") == ", "
    assert templates.knob_text("en", "passive_rule").startswith(" You are a passive person")
    assert templates.knob_text("zh", "topic_clause") == "（{topic}）"
    with pytest.raises(ValueError, match=r"knobs_en\.txt has no entry \[nope\]"):
        templates.knob_text("en", "nope")


def test_knob_table_format(tmp_path, monkeypatch):
    from rlver_jax.env import templates

    (tmp_path / "knobs_xx.txt").write_text(
        "preamble [not.read]\n[a]\n  two spaces, \nsecond line\n\n\n[b]\nlast", encoding="utf-8"
    )
    (tmp_path / "knobs_yy.txt").write_text("[a]\n1\n[a]\n2\n", encoding="utf-8")
    monkeypatch.setattr(templates, "PROMPT_DIR", tmp_path)
    templates._knob_table.cache_clear()
    try:
        assert templates._knob_table("xx") == {"a": "  two spaces, \nsecond line", "b": "last"}
        with pytest.raises(ValueError, match=r"knobs_yy\.txt:3: entry \[a\] appears twice"):
            templates._knob_table("yy")
        with pytest.raises(ValueError, match="no knob table for language 'zz'"):
            templates._knob_table("zz")
    finally:
        templates._knob_table.cache_clear()


# --- parsing -----------------------------------------------------------------------------

FULL = "Intent: comfort\nFit: fair\nInner reaction: ok\nFeeling: calmer\nEmotion change: +5"
PARSE_CASES = [
    (FULL, 5),
    ("Emotion change: -10", -10),
    ("**Emotion change**: **-3**", -3),
    ("### 5. Emotion change\n-3", -3),
    ("情绪变化：+5", 5),
    ("情绪变化：5分", 5),
    ("【情绪变化】：［-4］", -4),
    ("**情绪变化：** 减少3", -3),
    ("Emotion change (-10 to +10): +3", 3),
    ('Emotion change: "+7"', 7),
    ("Emotion change: “-2”", -2),
    ("blah blah\n\n+6", 6),
    ("Sure! Here is my analysis.\nEmotion change: 2\nHope this helps!", 2),
    ("Emotion change: from 40 to 45 (+5)", 5),
    ("Emotion change: no change", 0),
    ("情绪变化：－８", -8),
    ("Emotion change: \u22122", -2),
    ("5. 情绪变化: +2\n\n以上是我的分析。", 2),
    ("- **Emotion change:** +4", 4),
    ("情绪变化值：-6", -6),
    ("Emotion change: +2.6", 3),
    ("意图：安慰\n契合度：低\n内心反应：唉\n感受：失望\n情绪变化：-5", -5),
    ("Feeling: bad. My emotion change is -4 because of that.", -4),
    ("Feeling: bad\nEmotion change: 2024", None),
    ("Intent: x\nFit: y", None),
    ("nothing here at all", None),
    ("", None),
]


@pytest.mark.parametrize("text,delta", PARSE_CASES)
def test_parse_analyzer_cases(text, delta):
    result = parse_analyzer(text)
    assert result.delta == delta
    assert result.ok is (delta is not None)


def test_parse_analyzer_fields():
    r = parse_analyzer(FULL)
    assert r.fields == {"intent": "comfort", "fit": "fair", "reaction": "ok",
                        "feeling": "calmer", "delta": "+5"}
    assert r.raw == FULL


ACTOR_CASES = [
    ('Thinking: hmm\nDraft: ok\nMake it realistic: shorter\nFinal reply: "Yeah, maybe."\n\n(note)',
     "Yeah, maybe.", True, False),
    ("思考：嗯\n初稿：好吧\n改进：短一点\n**最终回复**：「那就这样吧，再见。」", "那就这样吧，再见。", True, True),
    ("Thinking: a\r\nFinal reply: ok then\r\n", "ok then", True, False),
    ("**Final reply:** Goodbye, thanks anyway.", "Goodbye, thanks anyway.", True, True),
    ("just a plain message", "just a plain message", False, False),
    ("Thinking: hmm\nDraft: meh ok", "meh ok", False, False),
    ("Thinking: only thoughts", None, False, False),
    ("", None, False, False),
]


@pytest.mark.parametrize("text,reply,ok,goodbye", ACTOR_CASES)
def test_parse_actor_cases(text, reply, ok, goodbye):
    r = parse_actor(text)
    assert (r.reply, r.ok, r.goodbye) == (reply, ok, goodbye)


def test_parse_actor_keeps_raw_punctuation_and_custom_goodbye():
    r = parse_actor("最终回复：好吧，（叹气）我知道了。")
    assert r.reply == "好吧，（叹气）我知道了。"
    assert parse_actor("Final reply: ciao!", goodbye_words=["Ciao"]).goodbye
    assert not parse_actor("Final reply: goodbyes are hard").goodbye


@pytest.mark.parametrize(
    "text,thought,reply,closed",
    [
        ("<think>plan</think>Hello", "plan", "Hello", True),
        ("plan</think>Hello", "plan", "Hello", True),
        ("<think>a</think>x<think>b</think> final ", "a x b", "final", True),
        ("<think>unfinished", "unfinished", "", False),
        ("<think>a</think> reply <think> more", "a more", "reply", False),
        ("no tags at all", "", "no tags at all", True),
        ("", "", "", True),
    ],
)
def test_split_think(text, thought, reply, closed):
    r = split_think(text)
    assert (r.reply, r.closed) == (reply, closed)
    assert " ".join(r.thought.split()) == thought


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_parsers_never_raise_on_any_text(text):
    a = parse_analyzer(text)
    assert a.delta is None or abs(a.delta) <= sim.MAX_PARSED_ABS_DELTA
    r = parse_actor(text)
    assert r.reply is None or isinstance(r.reply, str)
    t = split_think(text)
    assert isinstance(t.reply, str)


_LABELISH = st.sampled_from(
    ["Emotion change", "情绪变化", "Final reply", "最终回复", "Draft", "：", ":", "**", "#", "\n",
     "+", "-", "５", "12", "【", "】", "<think>", "</think>", "再见", "Goodbye", " ", "\u3000"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(_LABELISH, st.text(max_size=5)), max_size=30).map("".join))
def test_parsers_never_raise_on_label_soup(text):
    parse_analyzer(text)
    parse_actor(text)
    split_think(text)


def test_parsers_accept_non_strings():
    assert parse_analyzer(None).ok is False
    assert parse_actor(None).reply is None
    assert split_think(None).reply == ""
    assert parse_analyzer(12).delta == 12  # a bare number is a change
