"""Policy turns cut at `max_turn_tokens` (issue #17, item 3): counted, and handled by
`RolloutSettings.truncated_turn` ("pass" | "zero_reward" | "mask")."""

from __future__ import annotations

import numpy as np
import pytest

from rlver_jax.env import simulator as sim
from rlver_jax.env.profiles import SHIPPED, load_profiles
from rlver_jax.env.dialogue_log import dialogue_record
from rlver_jax.env.rollout import DialogueRollout, RolloutSettings
from rlver_jax.rl.batching import collate
from rlver_jax.env.users import RuleUser
from rlver_jax.tokenizer import IM_END, ChatTokenizer
from tests.scripted_user import ScriptedGenerator

MAX_TURN_TOKENS = 16
CUT = (0, 2)  # (row, call): dialogue 0's third and last reply runs past the limit


@pytest.fixture(scope="module")
def tok():
    return ChatTokenizer.tiny()


def _policy(tok):
    calls = {}

    def respond(row, prompt, max_new):
        call = calls[row] = calls.get(row, -1) + 1
        if (row, call) == CUT:
            return "and so on " * 40          # no end-of-turn token within the limit
        return f"ok {row}-{call}" + IM_END
    return ScriptedGenerator(tok, respond)


def _run(tok, mode, think=False):
    cfg = sim.settings_from_config({"preset": "hard", "max_turns": 3, "end_below": None})
    settings = RolloutSettings(think=think, max_turn_tokens=MAX_TURN_TOKENS, truncated_turn=mode)
    profiles = load_profiles(SHIPPED["en_train"])[:2]
    return DialogueRollout(tok, RuleUser(cfg), cfg, settings, _policy(tok)).run(
        None, profiles, seed=0)


def _cut_span(tok, sample):
    """[start, end) of the cut reply's tokens inside a no-think sample."""
    cut = tok.encode("and so on " * 40, allow_special=True)[:MAX_TURN_TOKENS]
    for start in range(len(sample.tokens) - len(cut) + 1):
        if sample.tokens[start:start + len(cut)] == cut:
            return start, start + len(cut)
    raise AssertionError("cut reply not found")


@pytest.mark.parametrize("mode", ["pass", "zero_reward", "mask"])
def test_truncated_turn_modes_no_think(tok, mode):
    result = _run(tok, mode)
    st, other = result.dialogues
    assert result.metrics["rollout/truncated_turns"] == 1
    assert other.turns == 3 and other.done_reason == "turn_limit"
    sample = next(s for s in result.samples if s.dialogue_id == st.dialogue_id)
    a, b = _cut_span(tok, sample)
    batch = collate(result.samples, pad_id=tok.pad_id)
    row = [s.dialogue_id for s in result.samples].index(st.dialogue_id)
    nonzero = np.flatnonzero(batch["rewards"][row])
    reward_at = int(nonzero[0]) if len(nonzero) else None
    if mode == "pass":
        assert st.turns == 3 and st.done_reason == "turn_limit"
        assert sample.loss_mask[a:b] == [1] * (b - a)
        assert result.metrics["end/truncated"] == 0.0
        # Trained as sampled: the reward sits on the cut turn's last token.
        assert reward_at == b - 1
    elif mode == "zero_reward":
        # The dialogue ends on the cut turn, which is never analysed; reward 0.
        assert st.done_reason == "truncated" and st.turns == 2
        assert sample.reward == 0.0 and result.summary.reward[0] == 0.0
        assert result.metrics["end/truncated"] == pytest.approx(0.5)
        assert len(st.records) == 2 and st.history[-1][0] == "assistant"
        assert dialogue_record(st)["reward"] == 0.0  # the log agrees with training
    else:
        # Out of the loss (and its log-probs zeroed); the dialogue still ran its course.
        assert st.turns == 3 and st.done_reason == "turn_limit"
        assert sample.loss_mask[a:b] == [0] * (b - a)
        assert sample.logprobs[a:b] == [0.0] * (b - a)
        assert sample.reward == pytest.approx(st.reward)
        # The reward sits on the end-of-turn token of the last complete turn.
        policy = np.flatnonzero(batch["loss_mask"][row])
        assert reward_at == int(policy[-1]) < a
        assert sample.tokens[reward_at] == tok.im_end_id


def test_truncated_turn_mask_drops_the_think_sample(tok):
    result = _run(tok, "mask", think=True)
    st = result.dialogues[0]
    turns = [s.turn for s in result.samples if s.dialogue_id == st.dialogue_id]
    assert turns == [0, 1] and st.turns == 3
    assert result.metrics["rollout/truncated_turns"] == 1
    assert len(result.samples) == 5


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="truncated_turn"):
        RolloutSettings(truncated_turn="drop")
