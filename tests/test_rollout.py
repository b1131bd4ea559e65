"""The batched multi-turn rollout (issue 4): masks, token alignment, think mode, GRPO groups,
dialogue routing, the emotion state machine, KV continuation and `collate`.

Two kinds of policy drive the rollouts here:

* the real `Sampler` on a tiny random Qwen2 (`create_model(get_preset("tiny"), 0)`), wrapped
  to record every call's prompts and outputs, for the four combinations of think mode and
  user (`RuleUser` with the hard preset; `LLMUser` with a tiny random simulator);
* `ScriptedSampler`, a stand-in with the sampler's interface that returns chosen text, for
  what a random model never does on its own: close a `<think>`, leave one open, or echo
  which dialogue its prompt came from.

Compile time dominates on CPU, so every real rollout uses one batch shape (4 rows), short
replies and short dialogues, and the simulator shares the policy's `Sampler` (same
architecture, weights are arguments), so both compile the same few programs once.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import numpy as np
import pytest

from rlver_jax.env import simulator as sim
from rlver_jax.env.profiles import SHIPPED, load_profiles
from rlver_jax.env.dialogue_log import dialogue_record
from rlver_jax.env.rollout import DialogueRollout, RolloutSettings, Sample
from rlver_jax.env.users import Analysis, LLMUser, RuleUser, SimulatorSampling, UserReply
from rlver_jax.rl.batching import collate
from rlver_jax.sampling import SampleOutput
from rlver_jax.tokenizer import IM_END, ChatTokenizer
from tests.scripted_user import ScriptedGenerator

MAX_TURN_TOKENS = 8
# Real-model dialogues are capped at 3 policy turns so that the prompts stay within two
# length buckets; the presets' own turn limits are exercised with the scripted policy.
REAL_MAX_TURNS = 3


# =============================================================================== helpers
@dataclasses.dataclass
class Call:
    """One `generate` call as the rollout made it and as the sampler answered."""

    prompts: list[list[int] | None]
    out: SampleOutput
    continued: bool            # a `previous` state was passed
    prefill_width: int | None  # width of the prefill block (real sampler only)


class RecordingSampler:
    """The real sampler, recording what it was asked and what it returned.

    With `continuation=False` every call re-prefills its whole prompt (no `previous` state),
    the baseline for the KV-continuation test.
    """

    def __init__(self, inner, prefill_widths: list[int], continuation: bool = True):
        self.inner = inner
        self.prefill_widths = prefill_widths
        self.continuation = continuation
        self.calls: list[Call] = []

    def generate(self, model, prompts, max_new_tokens, **kwargs):
        if not self.continuation:
            kwargs["previous"], kwargs["keep_state"] = None, False
        before = len(self.prefill_widths)
        out = self.inner.generate(model, prompts, max_new_tokens, **kwargs)
        width = self.prefill_widths[before] if len(self.prefill_widths) > before else None
        self.calls.append(Call([None if p is None else list(p) for p in prompts], out,
                               kwargs.get("previous") is not None, width))
        return out


class ScriptedSampler:
    """A policy stand-in: `script(row, prompt_text, call_index)` returns the reply text.

    The text is encoded and treated like a sampler's output: cut at `max_new_tokens`, cut
    after the first stop token; a script that appends `<|im_end|>` makes the turn "stop".
    Log-probs are distinct made-up numbers so that their alignment can be checked.
    """

    def __init__(self, tokenizer: ChatTokenizer, script: Callable[[int, str, int], str]):
        self.calls: list[Call] = []
        self._generator = ScriptedGenerator(
            tokenizer, lambda row, text, _max_new: script(row, text, len(self.calls)))

    def generate(self, model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                 stop_token_ids=(), seed=0, previous=None, keep_state=False):
        out = self._generator.generate(model, prompts, max_new_tokens,
                                       stop_token_ids=stop_token_ids)
        self.calls.append(Call([None if p is None else list(p) for p in prompts], out,
                               previous is not None, None))
        return out


class TaggedUser:
    """A deterministic fake user whose every message names the dialogue it was written for.

    `schedule` maps a dialogue id to (turn, how): after that policy turn the dialogue ends,
    "low" through an emotion crash in the analysis, "goodbye" through the user's reply.
    Every other turn raises the emotion by 1. `seen` records (dialogue id, reply) pairs
    that reached the analyzer.
    """

    name = "tagged"

    def __init__(self, schedule: dict[str, tuple[int, str]] | None = None):
        self.schedule = schedule or {}
        self.seen: list[tuple[str, str]] = []

    def openings(self, states, seed):
        return [f"[open {st.profile.id}]" for st in states]

    def _ends(self, st, how):
        turn, kind = self.schedule.get(st.dialogue_id, (None, None))
        return kind == how and turn == st.turns

    def analyze(self, states, replies, seed):
        out = []
        for st, reply in zip(states, replies):
            self.seen.append((st.dialogue_id, reply))
            # st.turns is the count before this analysis: the ending turn is turns + 1.
            turn, kind = self.schedule.get(st.dialogue_id, (None, None))
            delta = -100 if (kind == "low" and turn == st.turns + 1) else 1
            out.append(Analysis(delta, delta, True, 0, f"analysis for {st.dialogue_id}"))
        return out

    def replies(self, states, analyses, seed):
        out = []
        for st, a in zip(states, analyses):
            assert a.text == f"analysis for {st.dialogue_id}", "analysis routed to another dialogue"
            text = f"[to {st.dialogue_id} after {st.turns}]"
            if self._ends(st, "goodbye"):
                text += " Goodbye"
            out.append(UserReply(text, True, 0))
        return out


_TAG = re.compile(r"\[(?:open [^\]]+|to \S+ after \d+)\]")


def echo_last_tag(row: int, prompt_text: str, call: int) -> str:
    """Policy script: answer naming the last user tag of the prompt (the row's identity)."""
    tags = _TAG.findall(prompt_text)
    return f"re {tags[-1] if tags else '?'}" + IM_END


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def _row_outputs(calls: list[Call], row: int) -> list[tuple[list[int], list[int], SampleOutput]]:
    """(prompt, sampled tokens, whole output) of every call in which `row` took part."""
    return [(c.prompts[row], c.out.tokens[row], c.out) for c in calls
            if c.prompts[row] is not None]


def _expected_reward(st: sim.DialogueState) -> float:
    return 0.0 if st.done_reason == "format" else sim.reward(st.emotion)


def check_emotion_machine(st: sim.DialogueState, cfg: sim.SimulatorSettings) -> None:
    """The per-dialogue state machine of RLVER.md, replayed from the dialogue's records."""
    assert 1 <= st.turns <= cfg.max_turns and len(st.records) == st.turns
    emotion = cfg.start_emotion
    for k, r in enumerate(st.records, start=1):
        assert r.turn == k and r.emotion_before == emotion
        applied = cfg.fallback_delta if r.raw_delta is None else r.raw_delta
        assert r.emotion_after == sim.apply_delta(emotion, applied, cfg)
        assert r.delta == r.emotion_after - r.emotion_before
        if cfg.delta_clamp is not None:
            assert abs(r.delta) <= cfg.delta_clamp
        emotion = r.emotion_after
        if k < st.turns:
            # A dialogue that ended here would not have gone on.
            assert sim.termination_reason(emotion, k, cfg) is None
    assert st.emotion == emotion and st.done
    if st.done_reason == "goodbye":
        assert st.history[-1][0] == "user"
        assert sim.contains_goodbye(st.history[-1][1], (sim.goodbye_word(cfg, "en"),))
    elif st.done_reason in ("emotion_low", "emotion_high", "turn_limit"):
        assert sim.termination_reason(st.emotion, st.turns, cfg) == st.done_reason
        assert st.history[-1][0] == "assistant"   # no user reply after the end
    assert st.reward == min(max(st.emotion / 100, 0.0), 1.0)


def check_masks_and_rewards(result, calls: list[Call], think: bool, tok: ChatTokenizer,
                            group_size: int) -> None:
    """loss_mask is 1 exactly on the sampler's tokens; the reward sits on the last of them."""
    by_dialogue: dict[str, list[Sample]] = {}
    for s in result.samples:
        by_dialogue.setdefault(s.dialogue_id, []).append(s)
    prefix = tok.assistant_prefix_ids()
    for row, st in enumerate(result.dialogues):
        outputs = _row_outputs(calls, row)
        samples = by_dialogue[st.dialogue_id]
        assert len(outputs) == st.turns  # one sampled reply per analysed policy turn
        if think:
            assert len(samples) == len(outputs) == st.turns
            for k, (s, (prompt, sampled, out)) in enumerate(zip(samples, outputs)):
                assert s.turn == k
                assert s.tokens == prompt + sampled
                assert s.loss_mask == [0] * len(prompt) + [1] * len(sampled)
                assert s.logprobs[len(prompt):] == out.logprobs[row]
                assert s.raw_logprobs[len(prompt):] == out.raw_logprobs[row]
        else:
            (s,) = samples
            runs = _runs(s.loss_mask)
            assert len(runs) == len(outputs)
            for (a, b), (prompt, sampled, out) in zip(runs, outputs):
                # The prompt of each turn is the sample so far: nothing was re-tokenised.
                assert s.tokens[:len(prompt)] == prompt and len(prompt) == a
                assert s.tokens[a - len(prefix):a] == prefix
                assert s.tokens[a:b] == sampled
                assert s.logprobs[a:b] == out.logprobs[row]
                assert s.raw_logprobs[a:b] == out.raw_logprobs[row]
                stopped = out.stopped[row]
                assert stopped == (sampled[-1] in tok.eos_ids)
                if not stopped and b < len(s.tokens):
                    # The closing tag the rollout added is not a policy token.
                    assert s.tokens[b] == tok.im_end_id and s.loss_mask[b] == 0
            off = [t for t, m in zip(s.tokens, s.loss_mask) if not m]
            assert all(v == 0.0 for v, m in zip(s.logprobs, s.loss_mask) if not m)
            assert off.count(tok.im_start_id) >= 2 * len(outputs)  # system, user, headers
        for s in samples:
            assert s.group_id == row // group_size
            assert s.reward == pytest.approx(_expected_reward(st))
            last = max(i for i, m in enumerate(s.loss_mask) if m)
            batch = collate([s], pad_id=tok.pad_id)
            assert batch["rewards"][0, last] == pytest.approx(s.reward)
            assert np.count_nonzero(batch["rewards"][0]) == (s.reward != 0)


def check_alignment(result, cfg: sim.SimulatorSettings, tok: ChatTokenizer) -> None:
    """A no-think sample decodes to the ChatML rendering of the logged dialogue.

    Strings, not ids: a sampled reply need not be the canonical segmentation of its own
    text (the model may emit "he" + "llo" where the tokenizer would write "hello", or bytes
    that re-encode differently), so `encode(decode(ids)) != ids` in general. Its text is
    what the log holds, and the turns the rollout tokenised itself (system, user) must
    match `render_turn` id for id.
    """
    prefix, newline = tok.assistant_prefix_ids(), tok.encode("\n")
    for s, st in zip(result.samples, result.dialogues):
        assert s.dialogue_id == st.dialogue_id
        system = sim.render_policy_messages(st.profile, [], False, cfg)[0]["content"]
        history = [("system", system)] + list(st.history)
        if history[-1][0] == "user":
            # The user's goodbye ends the dialogue after the last policy turn: never trained.
            assert st.done_reason == "goodbye"
            history = history[:-1]
        runs = iter(_runs(s.loss_mask))
        expected, position = "", 0
        for role, text in history:
            if role != "assistant":
                # Turns the rollout tokenised itself: render_turn of the logged text, id for id.
                ids = tok.render_turn(role, text)
                assert s.tokens[position:position + len(ids)] == ids, role
                assert not any(s.loss_mask[position:position + len(ids)])
                position += len(ids)
                expected += tok.render_text([{"role": role, "content": text}])
                continue
            a, b = next(runs)
            assert s.tokens[position:a] == prefix
            sampled = s.tokens[a:b]
            assert tok.decode(sampled, skip_special_tokens=True) == text
            stopped = sampled[-1] in tok.eos_ids
            # The end of the turn: the stop token the policy sampled (<|im_end|>, or
            # <|endoftext|> which then stands in for it), else the <|im_end|> the rollout adds.
            closing = tok.decode(sampled[-1:]) if stopped else IM_END
            position = b if stopped else b + 1
            assert s.tokens[position:position + len(newline)] == newline
            position += len(newline)
            expected += f"<|im_start|>assistant\n{text}{closing}\n"
        assert position == len(s.tokens) and next(runs, None) is None
        assert tok.decode(s.tokens) == expected


# ============================================================================== fixtures
@pytest.fixture(scope="module")
def tok() -> ChatTokenizer:
    return ChatTokenizer.tiny()


@pytest.fixture(scope="module")
def profiles():
    return load_profiles(SHIPPED["en_train"])[:4]


@pytest.fixture(scope="module")
def models():
    """(policy, simulator, shared Sampler, prefill-width log)."""
    from rlver_jax.models import create_model, get_preset
    from rlver_jax.sampling import Sampler

    policy = create_model(get_preset("tiny"), 0)
    simulator = create_model(get_preset("tiny"), 1)
    # One bucket for every continuation suffix (user turn + header), so turns 2.. share one
    # prefill program.
    inner = Sampler(policy, min_prompt_bucket=64)
    widths: list[int] = []
    prefill = inner._prefill

    def recording_prefill(weights, cache, tokens, mask):
        widths.append(int(tokens.shape[1]))
        return prefill(weights, cache, tokens, mask)

    inner._prefill = recording_prefill
    return policy, simulator, inner, widths


def _llm_user(models, tok, cfg):
    _, simulator, inner, _ = models
    # Prompts are truncated (head + tail) to one length bucket; the analyzer / actor write a
    # few tokens, which rarely parse: the analysis falls back to a zero change at once. The
    # two limits differ (to tell the calls apart) but share one decode bucket (8).
    sampling = SimulatorSampling(temperature=0.7, max_analyzer_tokens=8, max_actor_tokens=7,
                                 max_prompt_tokens=256)
    user = LLMUser(cfg, simulator, tok, inner, sampling)
    user.prompts = []  # (max_new, messages) of every simulator call (no retries here)
    with_retries = user._with_retries

    def recording(stream, states, render, max_new, seed, parse, languages=None):
        user.prompts.extend((max_new, render(i, 0)) for i in range(len(states)))
        return with_retries(stream, states, render, max_new, seed, parse, languages)

    user._with_retries = recording
    return user


@dataclasses.dataclass
class RealRun:
    result: object
    calls: list[Call]
    cfg: sim.SimulatorSettings
    user: object
    group_size: int


@pytest.fixture(scope="module")
def real_runs(models, tok, profiles):
    """The four full rollouts on the tiny random policy, run once each."""
    policy, _, inner, widths = models
    runs = {}
    for user_kind in ("rule", "llm"):
        cfg = sim.settings_from_config({"preset": "hard", "max_turns": REAL_MAX_TURNS,
                                        "parse_retries": 0})
        for think in (False, True):
            if user_kind == "rule":
                # 2 profiles x 2: GRPO groups; the rule user ends dialogues at different turns.
                user, batch, group = RuleUser(cfg), profiles[:2], 2
            else:
                user, batch, group = _llm_user(models, tok, cfg), profiles, 1
            sampler = RecordingSampler(inner, widths)
            rollout = DialogueRollout(tok, user, cfg, RolloutSettings(
                think=think, group_size=group, max_turn_tokens=MAX_TURN_TOKENS), sampler)
            result = rollout.run(policy, batch, seed=11)
            runs[user_kind, think] = RealRun(result, sampler.calls, cfg, user, group)
    return runs


REAL = [("rule", False), ("rule", True), ("llm", False), ("llm", True)]
REAL_IDS = ["rule-nothink", "rule-think", "llm-nothink", "llm-think"]


# ======================================================================= real rollouts
@pytest.mark.parametrize("key", REAL, ids=REAL_IDS)
def test_real_rollout_masks_rewards_and_state(real_runs, tok, key):
    run = real_runs[key]
    result = run.result
    think = key[1]
    assert len(result.dialogues) == 4
    check_masks_and_rewards(result, run.calls, think, tok, run.group_size)
    for st in result.dialogues:
        check_emotion_machine(st, run.cfg)
        assert st.emotion >= 0
    # Rows keep their dialogue: an ended dialogue's row is None from then on.
    for row, st in enumerate(result.dialogues):
        active = [c.prompts[row] is not None for c in run.calls]
        assert active == sorted(active, reverse=True) and sum(active) == st.turns
    # Metrics agree with the dialogues.
    m = result.metrics
    assert m["dialogues"] == 4 and m["samples"] == len(result.samples)
    assert m["turns/mean"] == pytest.approx(np.mean([st.turns for st in result.dialogues]))
    assert m["reward/mean"] == pytest.approx(
        np.mean([_expected_reward(st) for st in result.dialogues]))
    assert m["tokens/policy"] == sum(len(t) for c in run.calls for t in c.out.tokens)
    assert set(result.timing) == {"policy_s", "analyzer_s", "actor_s"}
    if key[0] == "llm":
        # A random analyzer rarely parses: then the fallback change (0) applies.
        for r in (r for st in result.dialogues for r in st.records):
            assert r.parse_ok or (r.raw_delta is None and r.delta == run.cfg.fallback_delta)
        # One batched call per step for all dialogues: openings, then analyzer + actor.
        turns = max(st.turns for st in result.dialogues)
        assert run.user.stats["simulator_calls"] == 1 + 2 * turns - 1
    records = [dialogue_record(st, step=0) for st in result.dialogues]
    assert [r["turns"] for r in records] == [st.turns for st in result.dialogues]


@pytest.mark.parametrize("key", [("rule", False), ("llm", False)],
                         ids=["rule-nothink", "llm-nothink"])
def test_real_rollout_token_alignment(real_runs, tok, key):
    run = real_runs[key]
    check_alignment(run.result, run.cfg, tok)


def test_real_rollout_think_prompts_drop_old_thoughts(real_runs, tok):
    """Think mode: the prompt of turn k is the chat of the history (thoughts removed)."""
    run = real_runs["rule", True]
    by_dialogue: dict[str, list[Sample]] = {}
    for s in run.result.samples:
        by_dialogue.setdefault(s.dialogue_id, []).append(s)
    for st in run.result.dialogues:
        for k, s in enumerate(by_dialogue[st.dialogue_id]):
            prompt_len = s.loss_mask.index(1)
            messages = sim.render_policy_messages(st.profile, st.history[:2 * k + 1], True,
                                                  run.cfg)
            assert s.tokens[:prompt_len] == tok.apply_chat_template(messages)


def test_real_rollout_grpo_groups(real_runs):
    result = real_runs["rule", False].result
    states = result.dialogues
    ids = [st.dialogue_id for st in states]
    assert len(set(ids)) == len(ids)
    for group in (states[0:2], states[2:4]):
        assert group[0].profile is group[1].profile
        assert group[0].history[0] == group[1].history[0]  # the same opening message
    assert states[0].history[0] != states[2].history[0]
    assert [s.group_id for s in result.samples] == [0, 0, 1, 1]
    batch = collate(result.samples, pad_id=0)
    assert batch["group_ids"].tolist() == [0, 0, 1, 1]


def test_llm_simulator_sees_only_visible_text(real_runs):
    """Every analyzer call shows the policy's latest reply as `split_think` leaves it (the
    random policy may emit a stray <think> token) and no thought tag."""
    run = real_runs["llm", True]
    analyzer = [m for max_new, m in run.user.prompts
                if max_new == run.user.sampling.max_analyzer_tokens]
    states = run.result.dialogues
    # Analyzer rows go turn by turn, live dialogues in row order.
    expected = [sim.split_think(st.history[2 * t + 1][1]).reply.strip()
                for t in range(max(st.turns for st in states)) for st in states
                if st.turns > t]
    assert len(analyzer) == len(expected)
    for messages, visible in zip(analyzer, expected):
        body = "\n".join(m["content"] for m in messages)
        assert "<think>" not in body and "</think>" not in body
        assert visible in body


# =========================================================== continuation vs re-prefill
def _sharpened(model, scale: float = 8.0):
    """The same network with its matrices scaled up: with the stock 0.02 init a tiny model's
    greedy choice hardly depends on the context (it writes newlines whatever came before),
    which would let a continuation that attends to the wrong cache slots pass unnoticed.
    Same graph, shapes and dtypes, so the sampler's compiled programs serve it unchanged."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x * scale if x.ndim >= 2 else x,
                         jax.tree.map(np.asarray, state))
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("think", [False, True], ids=["nothink", "think"])
def test_kv_continuation_matches_reprefill(models, tok, profiles, think):
    """Rollouts at temperature 0: continuing each row's KV cache across turns samples
    exactly the tokens that re-prefilling the whole dialogue every turn samples. In think
    mode each row first rolls back to its previous prompt (dropping the old thought)."""
    _, _, inner, widths = models
    policy = _sharpened(models[0])
    cfg = sim.settings_from_config({"preset": "hard", "max_turns": REAL_MAX_TURNS})
    settings = RolloutSettings(group_size=2, max_turn_tokens=MAX_TURN_TOKENS, temperature=0.0,
                               think=think)
    rolled_back = inner.rolled_back_rows
    results = {}
    for continuation in (True, False):
        sampler = RecordingSampler(inner, widths, continuation=continuation)
        rollout = DialogueRollout(tok, RuleUser(cfg), cfg, settings, sampler)
        results[continuation] = (rollout.run(policy, profiles[:2], seed=3), sampler.calls)
    (cont, cont_calls), (fresh, fresh_calls) = results[True], results[False]
    assert max(st.turns for st in cont.dialogues) >= 2  # there was something to continue
    # Only think mode drops tokens from the cache.
    assert (inner.rolled_back_rows > rolled_back) == think
    # The continued run prefilled only the new turn; the baseline the whole prompt.
    for c in cont_calls[1:]:
        longest = max(len(p) for p in c.prompts if p is not None)
        assert c.continued and c.prefill_width < longest
    for c in fresh_calls:
        assert not c.continued
        assert c.prefill_width >= max(len(p) for p in c.prompts if p is not None)
    assert len(cont.samples) == len(fresh.samples)
    for a, b in zip(cont.samples, fresh.samples):
        assert a.tokens == b.tokens and a.loss_mask == b.loss_mask
        np.testing.assert_allclose(a.raw_logprobs, b.raw_logprobs, atol=1e-4)
    assert [st.history for st in cont.dialogues] == [st.history for st in fresh.dialogues]


# ============================================================== scripted-policy rollouts
def _assert_no_mixup(result, user: TaggedUser) -> None:
    """Every message of every dialogue was generated for that dialogue."""
    for st in result.dialogues:
        me = st.dialogue_id
        assert st.history[0] == ("user", f"[open {st.profile.id}]")
        for k, (role, text) in enumerate(st.history[1:], start=1):
            if role == "user":
                assert text.startswith(f"[to {me} after {(k + 1) // 2}]"), (me, text)
            else:
                # The policy echoed the tag of the user message right before its turn.
                previous_user = st.history[k - 1][1]
                tag = _TAG.findall(previous_user)[-1]
                assert text == f"re {tag}", (me, text)
        mine = [reply for d, reply in user.seen if d == me]
        assert mine == [t for r, t in st.history if r == "assistant"][:len(mine)]


def test_replies_never_reach_another_dialogue(tok, profiles):
    """The regression of RLVER's reference code: dialogues that end early (at different
    turns, through the analyzer or the user's goodbye) must not shift any reply into a
    neighbour. The fake policy echoes its prompt's identity, the fake user its dialogue."""
    cfg = sim.settings_from_config({"preset": "hard", "max_turns": 4})
    schedule = {"d-0-0": (1, "low"), "d-1-0": (2, "goodbye"), "d-0-1": (3, "low")}
    user = TaggedUser(schedule)
    sampler = ScriptedSampler(tok, echo_last_tag)
    rollout = DialogueRollout(tok, user, cfg, RolloutSettings(group_size=2), sampler)
    result = rollout.run(None, profiles[:2], seed=0)
    states = {st.dialogue_id: st for st in result.dialogues}
    assert {d: (st.turns, st.done_reason) for d, st in states.items()} == {
        "d-0-0": (1, "emotion_low"), "d-0-1": (3, "emotion_low"),
        "d-1-0": (2, "goodbye"), "d-1-1": (4, "turn_limit")}
    _assert_no_mixup(result, user)
    # The emotion path of each dialogue is its own schedule's.
    assert [r.emotion_after for r in states["d-1-1"].records] == [31, 32, 33, 34]
    assert [r.emotion_after for r in states["d-0-1"].records] == [31, 32, 0]
    # Ended rows sit out as None; live rows keep their index.
    assert [c.prompts[0] is None for c in sampler.calls] == [False, True, True, True]
    assert [c.prompts[3] is None for c in sampler.calls] == [False, False, False, False]
    # The check itself has teeth: swap two replies between dialogues and it must fail.
    a, b = states["d-0-1"], states["d-1-1"]
    a.history[2], b.history[2] = b.history[2], a.history[2]
    with pytest.raises(AssertionError):
        _assert_no_mixup(result, user)


class _PositionalUser(TaggedUser):
    """The reference code's fault, reproduced inside a user: the k-th live dialogue gets the
    reply of the k-th simulator of the full list, which stops matching once one has ended."""

    def replies(self, states, analyses, seed):
        if not hasattr(self, "slots"):
            self.slots = [st.dialogue_id for st in states]
        out = super().replies(states, [Analysis(0, 0, True, 0, f"analysis for {st.dialogue_id}")
                                       for st in states], seed)
        return [UserReply(r.text.replace(st.dialogue_id, slot), True, 0)
                for r, st, slot in zip(out, states, self.slots)]


def test_mixup_check_catches_the_reference_fault(tok, profiles):
    cfg = sim.settings_from_config({"preset": "hard", "max_turns": 4})
    user = _PositionalUser({"d-0-0": (1, "low"), "d-0-1": (3, "low")})
    rollout = DialogueRollout(tok, user, cfg, RolloutSettings(group_size=2),
                              ScriptedSampler(tok, echo_last_tag))
    result = rollout.run(None, profiles[:2], seed=0)
    with pytest.raises(AssertionError):
        _assert_no_mixup(result, user)


def _think_script(unclosed: dict[tuple[int, int], bool] | None = None):
    """Replies with a thought naming the row and call, then a visible reply; (row, call)
    pairs in `unclosed` open a thought that never closes (cut by the token limit)."""
    unclosed = unclosed or {}

    def script(row: int, prompt: str, call: int) -> str:
        if unclosed.get((row, call)):
            return "<think>" + " and then I keep on thinking" * 20
        return f"<think>zqthought row {row} call {call}</think> visible {row}-{call}" + IM_END
    return script


def test_think_samples_per_turn_without_old_thoughts(tok, profiles):
    cfg = sim.settings_from_config({"preset": "hard", "max_turns": 3})
    user = TaggedUser()
    sampler = ScriptedSampler(tok, _think_script())
    settings = RolloutSettings(think=True, group_size=2, max_turn_tokens=64)
    result = DialogueRollout(tok, user, cfg, settings, sampler).run(None, profiles[:2], seed=0)
    assert len(result.samples) == 4 * 3
    for row, st in enumerate(result.dialogues):
        samples = [s for s in result.samples if s.dialogue_id == st.dialogue_id]
        assert [s.turn for s in samples] == [0, 1, 2]
        for k, s in enumerate(samples):
            n = s.loss_mask.index(1)
            prompt = tok.decode(s.tokens[:n])
            assert "zqthought" not in prompt
            for j in range(k):
                assert f"visible {row}-{j}" in prompt
            response = tok.decode(s.tokens[n:])
            assert response.startswith(f"<think>zqthought row {row} call {k}</think>")
            assert s.reward == pytest.approx(st.reward) and s.group_id == row // 2
        # The simulator was shown the raw generation; the history keeps it for the log.
        assert [r for d, r in user.seen if d == st.dialogue_id] == \
            [t for role, t in st.history if role == "assistant"]


@pytest.mark.parametrize("mode", ["pass", "zero_reward"])
def test_unclosed_think(tok, profiles, mode):
    """Row 0 leaves its second thought open. "pass" goes on (and counts it); "zero_reward"
    ends that dialogue at once with reward 0 and reason "format"."""
    cfg = sim.settings_from_config({"preset": "hard", "max_turns": 3})
    user = TaggedUser()
    sampler = ScriptedSampler(tok, _think_script({(0, 1): True}))
    settings = RolloutSettings(think=True, group_size=2, max_turn_tokens=16,
                               unclosed_think=mode)
    result = DialogueRollout(tok, user, cfg, settings, sampler).run(None, profiles[:2], seed=0)
    st = result.dialogues[0]
    samples = [s for s in result.samples if s.dialogue_id == st.dialogue_id]
    raw = st.history[3][1]
    assert not sampler.calls[1].out.stopped[0]
    if mode == "pass":
        # The user (and the log) read the text with the dangling tag removed; the training
        # sample keeps the tokens exactly as sampled.
        assert "<think>" not in raw and raw
        assert "<think>" in tok.decode(samples[1].tokens[samples[1].loss_mask.index(1):])
    else:
        assert not sim.split_think(raw).closed
    assert result.metrics["rollout/format_violations"] == 1
    if mode == "zero_reward":
        assert st.done_reason == "format" and st.turns == 1 and len(samples) == 2
        assert st.emotion == 31  # the first turn's change stands; the reward does not
        assert all(s.reward == 0.0 for s in samples)
        assert result.metrics["end/format"] == pytest.approx(0.25)
        # The unfinished thought never reached the user.
        assert raw not in [r for _, r in user.seen]
        assert result.metrics["reward/mean"] == pytest.approx(3 * 0.33 / 4)
    else:
        assert st.done_reason == "turn_limit" and st.turns == 3 and len(samples) == 3
        assert all(s.reward == pytest.approx(0.33) for s in samples)
        assert result.metrics["end/format"] == 0.0
    others = [s for s in result.samples if s.dialogue_id != st.dialogue_id]
    assert all(s.reward == pytest.approx(0.33) for s in others)


def test_llm_user_never_sees_thoughts(models, tok, profiles):
    """The real (tiny) simulator behind a scripted think-mode policy: no analyzer or actor
    prompt holds a thought, and each analyzer prompt holds the reply after </think>."""
    cfg = sim.settings_from_config({"preset": "hard", "max_turns": 2, "parse_retries": 0})
    user = _llm_user(models, tok, cfg)
    sampler = ScriptedSampler(tok, _think_script({(3, 1): True}))
    settings = RolloutSettings(think=True, max_turn_tokens=64)
    result = DialogueRollout(tok, user, cfg, settings, sampler).run(None, profiles, seed=0)
    assert [st.turns for st in result.dialogues] == [2, 2, 2, 2]
    analyzer = [m for n, m in user.prompts if n == user.sampling.max_analyzer_tokens]
    assert len(analyzer) == 8 and len(user.prompts) == 4 + 8 + 4  # openings, analyses, replies
    for _, messages in user.prompts:
        body = "\n".join(m["content"] for m in messages)
        assert "zqthought" not in body and "<think>" not in body
    # Analyzer calls go turn by turn, rows in order. The unclosed reply is passed on raw
    # (unclosed_think="pass"), without its dangling tag.
    for k, messages in enumerate(analyzer):
        call, row = divmod(k, 4)
        body = "\n".join(m["content"] for m in messages)
        if (row, call) != (3, 1):
            assert f"visible {row}-{call}" in body
        else:
            assert "keep on thinking" in body


def _long_think_script(unclosed: dict[tuple[int, int], bool]):
    """Like `_think_script`, with visible replies long enough for a transcript to outgrow
    a tight simulator prompt cap within a few turns."""
    short = _think_script(unclosed)

    def script(row: int, prompt: str, call: int) -> str:
        text = short(row, prompt, call)
        filler = f" I hear you, row {row} call {call}, tell me more about it" * 4
        return text.replace(IM_END, filler + IM_END)
    return script


def _simulator_run(models, tok, profiles, *, reuse: bool, max_prompt_tokens: int,
                   max_turns: int = 2):
    """A greedy tiny simulator behind a scripted think-mode policy: GRPO groups of 2, one
    dialogue ending early (an unclosed thought, zero reward), every analyzer and most actor
    outputs retried once (a random model rarely parses)."""
    _, simulator, inner, _ = models
    cfg = sim.settings_from_config({"preset": "hard", "max_turns": max_turns,
                                    "parse_retries": 1})
    sampling = SimulatorSampling(temperature=0.0, max_analyzer_tokens=8, max_actor_tokens=7,
                                 max_prompt_tokens=max_prompt_tokens, reuse_cache=reuse)
    user = LLMUser(cfg, simulator, tok, inner, sampling)
    policy = ScriptedSampler(tok, _long_think_script({(1, 1): True}))
    settings = RolloutSettings(think=True, group_size=2, max_turn_tokens=96,
                               unclosed_think="zero_reward")
    return DialogueRollout(tok, user, cfg, settings, policy).run(None, profiles, seed=3)


def test_simulator_cache_reuse_changes_no_greedy_output(models, tok, profiles):
    """With the simulator at temperature 0, keeping its KV cache per dialogue (continuation,
    retries rolled back to their prompt, the group's head forked, the oldest turn dropped at
    the prompt cap) gives the same analyzer texts, user replies and emotions as
    re-prefilling every prompt, dialogue by dialogue, while the other dialogue has ended.
    A short persona keeps the prompts (and the test) small; the cap (850 tokens) truncates
    one analyzer prompt of the second turn."""
    from tests.scripted_user import tagged_profile

    runs = {reuse: _simulator_run(models, tok, [tagged_profile("a")], reuse=reuse,
                                  max_prompt_tokens=850) for reuse in (True, False)}
    on, off = runs[True], runs[False]
    assert [(st.turns, st.done_reason) for st in on.dialogues] == [(2, "turn_limit"),
                                                                   (1, "format")]
    for a, b in zip(on.dialogues, off.dialogues):
        assert a.dialogue_id == b.dialogue_id
        assert [r.analyzer_text for r in a.records] == [r.analyzer_text for r in b.records]
        assert [r.user_reply for r in a.records] == [r.user_reply for r in b.records]
        assert [r.emotion_after for r in a.records] == [r.emotion_after for r in b.records]
        assert a.history == b.history
    m_on, m_off = on.metrics, off.metrics
    assert m_on["rollout/parse_failures"] == m_off["rollout/parse_failures"] > 0  # retried
    assert m_on["rollout/simulator_truncations"] == m_off["rollout/simulator_truncations"] == 1
    # Same prompts either way: the reused tokens are the ones not prefilled again.
    total = m_off["rollout/simulator_prefill_tokens"]
    assert m_off["rollout/simulator_reused_tokens"] == 0
    assert (m_on["rollout/simulator_prefill_tokens"] + m_on["rollout/simulator_reused_tokens"]
            == total)
    # Short heads and two turns: about 3/5 reused here (2/3 with the shipped profiles).
    assert m_on["rollout/simulator_reused_tokens"] >= 0.5 * total
    assert m_on["rollout/simulator_tokens"] == m_off["rollout/simulator_tokens"] > 0


def test_llm_user_truncation_drops_whole_oldest_turns(tok, profiles):
    """Over `max_prompt_tokens` the oldest user / policy turns go, whole, until the prompt
    is at most TRUNCATE_TO_FRACTION of the cap; the static head stays; the next turn keeps
    what was dropped (its prompt extends the shortened one) and counts no new truncation."""
    from rlver_jax.env import users

    cfg = sim.settings_from_config({"preset": "hard"})
    history = [("user" if k % 2 == 0 else "assistant", f"message number {k} " * 12)
               for k in range(9)]

    def render(drop):
        if drop > len(history) - 1:
            return None
        return sim.render_analyzer_prompt(profiles[0], history[drop:], "newest", 30, cfg)

    ids_of = lambda drop: tok.apply_chat_template(render(drop), add_generation_prompt=True)
    cap = len(ids_of(0)) - 1
    user = LLMUser(cfg, None, tok, None, SimulatorSampling(max_prompt_tokens=cap))
    stream = users._Stream()
    ids = user._prompt(stream, "d", render)
    drop = stream.dropped["d"]
    assert drop > 0 and drop % users.MESSAGES_PER_TURN == 0
    assert ids == ids_of(drop) and len(ids) <= users.TRUNCATE_TO_FRACTION * cap
    assert len(ids_of(drop - 2)) > users.TRUNCATE_TO_FRACTION * cap  # no more than needed
    assert render(drop)[0] == render(0)[0]  # the static head
    assert user.stats["simulator_truncations"] == 1
    history += [("assistant", "a short reply"), ("user", "a short answer")]
    longer = user._prompt(stream, "d", render)
    assert stream.dropped["d"] == drop and user.stats["simulator_truncations"] == 1
    assert longer == ids_of(drop)


# ============================================================ emotion state machine
def _mood_script(row: int, prompt: str, call: int) -> str:
    """A mix of warm, need-flavoured, plain and garbled replies: emotions go both ways."""
    replies = ["On one hand it is complicated, but also fair to say both sides matter. "
               "Maybe try a first step together: plan the next talk.",
               "@@## $$%% ^^&&",
               "I hear you, friend. At the same time, how about we suggest a plan with a few "
               "options? Both of you could balance it.",
               "ok",
               "However you look at it, there is balance to find. Could you try one next step?"]
    return replies[(row + call) % len(replies)] + IM_END


@pytest.mark.parametrize("preset,start,max_turns", [("sage", 40, 10), ("hard", 30, 8)])
def test_emotion_state_machine_per_preset(tok, preset, start, max_turns):
    cfg = sim.settings_from_config({"preset": preset})
    assert cfg.start_emotion == start and cfg.max_turns == max_turns
    source = SHIPPED["en_eval" if preset == "sage" else "en_train"]
    batch = load_profiles(source)[:4]
    sampler = ScriptedSampler(tok, _mood_script)
    result = DialogueRollout(tok, RuleUser(cfg), cfg, RolloutSettings(max_turn_tokens=64),
                             sampler).run(None, batch, seed=1)
    deltas = []
    for st, profile in zip(result.dialogues, batch):
        check_emotion_machine(st, cfg)
        deltas += [r.delta for r in st.records]
        if preset == "sage":
            assert st.history[0][1] == profile.first_talk  # fixed first message
            assert all(abs(r.delta) <= 10 for r in st.records)
        else:
            assert st.done_reason != "emotion_high"        # training: no ceiling ending
    assert any(d > 0 for d in deltas) and any(d < 0 for d in deltas)
    assert max(st.turns for st in result.dialogues) == max_turns
    if preset == "sage":
        # The clamp was exercised, not just never needed.
        assert any(abs(r.raw_delta) > 10 and abs(r.delta) == 10
                   for st in result.dialogues for r in st.records)


# ============================================================================= collate
# (the collate unit test is in tests/test_batching.py)


def test_collate_of_real_samples(real_runs, tok):
    for key in REAL:
        samples = real_runs[key].result.samples
        out = collate(samples, pad_id=tok.pad_id)
        width = out["tokens"].shape[1]
        assert width >= max(len(s.tokens) for s in samples) and width & (width - 1) == 0
        for i, s in enumerate(samples):
            n = len(s.tokens)
            assert out["tokens"][i, :n].tolist() == s.tokens
            assert (out["tokens"][i, n:] == tok.pad_id).all()
            last = max(j for j, m in enumerate(s.loss_mask) if m)
            assert out["rewards"][i].sum() == pytest.approx(s.reward)
            assert out["rewards"][i, last] == pytest.approx(s.reward)
