"""The real `LLMUser` inside the real rollout, with a scripted simulator (issue #17, item 2).

The simulator model is replaced by `ScriptedSimulator` (tests/scripted_user.py): planned
texts per dialogue and per call, routed by the dialogue tag in each prompt. What runs for
real: the rollout loop, `LLMUser`'s prompt rendering, chat templating, retry loop, decoding
and parsing, and the dialogue state machine.
"""

from __future__ import annotations

import re

import pytest

from rlver_jax.env import simulator as sim
from rlver_jax.env.rollout import DialogueRollout, RolloutSettings
from rlver_jax.env.users import LLMUser, SimulatorSampling
from rlver_jax.tokenizer import IM_END, ChatTokenizer
from tests.scripted_user import (UNPARSABLE_ACTOR, UNPARSABLE_ANALYSIS, ScriptedGenerator,
                                 ScriptedSimulator, actor_reply, analysis, tagged_profile,
                                 visible_turns)

# Distinct budgets: the double tells analyzer from actor calls by them.
SAMPLING = SimulatorSampling(max_analyzer_tokens=160, max_actor_tokens=120,
                             max_prompt_tokens=100_000)
_USER_TAG = re.compile(r"<([a-z0-9]+) t(\d+)>")


@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.tiny()


def _echo_policy(tok) -> ScriptedGenerator:
    """The policy names the last user tag of its prompt: who it thinks it is talking to."""
    def respond(row, prompt, max_new):
        tags = _USER_TAG.findall(prompt)
        key, turn = tags[-1] if tags else ("?", "?")
        return f"reply to {key} t{turn}" + IM_END
    return ScriptedGenerator(tok, respond)


def _emotion_line(emotion: int) -> str:
    """The analyzer template's line that states the current emotion, filled in."""
    system, user = sim.load_template("analyzer_en")
    line = next(ln for ln in f"{system}\n{user}".splitlines() if "{emotion}" in ln)
    return line.format(emotion=emotion).strip()


def _run(tok, settings, plan, keys, route="prompt", think=False, max_turn_tokens=32):
    double = ScriptedSimulator(tok, SAMPLING, plan, route=route)
    user = LLMUser(settings, None, tok, double, SAMPLING)
    rollout = DialogueRollout(tok, user, settings,
                              RolloutSettings(think=think, max_turn_tokens=max_turn_tokens),
                              _echo_policy(tok))
    result = rollout.run(None, [tagged_profile(k) for k in keys], seed=0)
    return result, double


def test_analyzer_prompt_shows_the_current_emotion(tok):
    """Through LLMUser's wiring: +7 per turn, and each analyzer prompt states the emotion
    the dialogue has at that moment (30, 37, 44), not the initial one."""
    settings = sim.settings_from_config({"preset": "hard", "language": "en", "max_turns": 3})
    plan = {k: {"analyzer": [analysis(+7)],
                "actor": lambda i, p, k=k: actor_reply(f"<{k} t{i}> fine.")}
            for k in ("a", "b")}
    result, double = _run(tok, settings, plan, ["a", "b"])
    for st in result.dialogues:
        key = double.key_of(st.profile.player)
        assert [r.emotion_after for r in st.records] == [37, 44, 51]
        prompts = double.prompts(key, "analyzer")
        assert len(prompts) == 3
        for prompt, emotion in zip(prompts, (30, 37, 44)):
            assert _emotion_line(emotion) in prompt
            assert all(_emotion_line(e) not in prompt for e in {30, 37, 44} - {emotion})


def _retry_plan():
    """Four dialogues, parse_retries=2 (three attempts per step):
    a: turn 1 analysis fails once then parses; turn 2 crashes the emotion (ends).
    b: turn 1 analysis never parses (fallback 0); turn 2 actor never parses (fallback).
    c: turn 1 actor fails twice then parses; the turn 2 reply says goodbye (ends).
    d: every first attempt fails, every second parses; runs to the turn limit (3).
    Every actor text names its dialogue, turn and attempt."""
    def actor(key, fail_at=(), goodbye_turn=None):
        def text(i, prompt):
            # i counts this dialogue's actor calls (opening = 0); recover the turn from the
            # number of analyses served so far is unnecessary: attempts are tagged by i.
            if i in fail_at:
                return UNPARSABLE_ACTOR
            bye = " Goodbye." if goodbye_turn is not None and i == goodbye_turn else ""
            return actor_reply(f"<{key} t{i}> hm.{bye}")
        return text
    return {
        "a": {"analyzer": [UNPARSABLE_ANALYSIS, analysis(+5), analysis(-90)],
              "actor": actor("a")},
        "b": {"analyzer": [UNPARSABLE_ANALYSIS] * 3 + [analysis(+2)],
              "actor": actor("b", fail_at=(2, 3, 4))},
        "c": {"analyzer": [analysis(+1)],
              "actor": actor("c", fail_at=(1, 2), goodbye_turn=4)},
        "d": {"analyzer": [UNPARSABLE_ANALYSIS, analysis(+3)] * 3,
              "actor": actor("d", fail_at=(1, 3))},
    }


def _assert_own_replies(result, double):
    """Every user message of a dialogue was written for that dialogue, and every policy
    reply answers its own dialogue's previous user message."""
    for st in result.dialogues:
        key = double.key_of(st.profile.player)
        for k, (role, text) in enumerate(st.history):
            if role == "user":
                if text == sim.FALLBACK_USER_REPLY["en"]:
                    continue
                assert _USER_TAG.search(text).group(1) == key, (key, text)
            else:
                previous = _USER_TAG.findall(st.history[k - 1][1])
                if previous:
                    assert text == f"reply to {previous[-1][0]} t{previous[-1][1]}"
                    assert previous[-1][0] == key


def test_retries_route_every_reply_to_its_own_dialogue(tok):
    settings = sim.settings_from_config({"preset": "hard", "language": "en", "max_turns": 3,
                                         "parse_retries": 2, "fallback_delta": 0})
    result, double = _run(tok, settings, _retry_plan(), ["a", "b", "c", "d"])
    states = {double.key_of(st.profile.player): st for st in result.dialogues}
    assert {k: (st.turns, st.done_reason) for k, st in states.items()} == {
        "a": (2, "emotion_low"), "b": (3, "turn_limit"), "c": (2, "goodbye"),
        "d": (3, "turn_limit")}
    _assert_own_replies(result, double)
    # Emotion paths: each dialogue's own planned changes (b's failed step falls back to 0).
    assert [r.emotion_after for r in states["a"].records] == [35, 0]
    assert [r.emotion_after for r in states["b"].records] == [30, 32, 34]
    assert [r.emotion_after for r in states["c"].records] == [31, 32]
    assert [r.emotion_after for r in states["d"].records] == [33, 36, 39]
    assert [r.parse_failures for r in states["d"].records] == [1, 1, 1]
    assert [(r.parse_ok, r.raw_delta) for r in states["b"].records] == [
        (False, None), (True, 2), (True, 2)]
    # b's second actor step never parsed: the neutral fallback message, counted.
    assert visible_turns(states["b"].history, "user")[2] == sim.FALLBACK_USER_REPLY["en"]
    # c's first reply came on its third attempt; d's openings and replies on their second.
    assert visible_turns(states["c"].history, "user")[1].startswith("<c t3>")
    assert visible_turns(states["d"].history, "user")[1:] == ["<d t2> hm.", "<d t4> hm."]
    # Fallbacks and failures are counted: analyzer a1 + b3 + d3, actor b3 + c2 + d2.
    m = result.metrics
    assert m["rollout/analyzer_fallbacks"] == 1 and m["rollout/actor_fallbacks"] == 1
    assert m["rollout/parse_failures"] == (1 + 3 + 3) + (3 + 2 + 2)


def test_positional_routing_is_caught(tok):
    """The test's check has teeth: routing simulator rows by position (the reference code's
    fault) while some dialogues retry or have ended sends replies to the wrong dialogue."""
    settings = sim.settings_from_config({"preset": "hard", "language": "en", "max_turns": 3,
                                         "parse_retries": 2, "fallback_delta": 0})
    result, double = _run(tok, settings, _retry_plan(), ["a", "b", "c", "d"], route="position")
    with pytest.raises(AssertionError):
        _assert_own_replies(result, double)


def test_no_think_reply_is_shown_whole(tok):
    """Without think mode a stray <think> in a reply hides nothing from the simulator; in
    think mode only the text after the last </think> is shown."""
    for think in (False, True):
        settings = sim.settings_from_config({"preset": "hard", "language": "en",
                                             "max_turns": 1})
        plan = {"a": {"analyzer": [analysis(+1)], "actor": [actor_reply("<a t0> hi")]}}
        double = ScriptedSimulator(tok, SAMPLING, plan)
        user = LLMUser(settings, None, tok, double, SAMPLING)
        policy = ScriptedGenerator(
            tok, lambda r, p, n: "see <think> the rest stays visible" + IM_END)
        DialogueRollout(tok, user, settings, RolloutSettings(think=think, max_turn_tokens=32,
                                                             unclosed_think="pass"),
                        policy).run(None, [tagged_profile("a")], seed=0)
        prompt = double.prompts("a", "analyzer")[0]
        assert "the rest stays visible" in prompt
        # No-think: shown as written; think ("pass"): the dangling tag is dropped.
        assert ("see <think> the rest" in prompt) is (not think)
