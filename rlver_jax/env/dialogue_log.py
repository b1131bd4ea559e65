"""The dialogue log: one JSON record per dialogue (every turn, the emotion before and after,
the analyzer's text), as training's dialogues.jsonl and evaluation's report write it."""

from __future__ import annotations

import json
from typing import Any, Sequence

from rlver_jax import storage
from rlver_jax.env import simulator as sim
from rlver_jax.env.profiles import hidden_need_category, personality
from rlver_jax.env.rollout import DialogueRollout


def dialogue_record(state: sim.DialogueState, step: int | None = None,
                    reward: float | None = None) -> dict[str, Any]:
    """A JSON-friendly audit record of one dialogue: every turn, emotion before/after."""
    profile = state.profile
    turns = []
    records = iter(state.records)
    pending_user = None
    for role, text in state.history:
        if role == "user":
            pending_user = text
            continue
        record = next(records, None)
        split = (sim.split_think(text) if state.think
                 else sim.ThinkSplit(thought="", reply=text.strip(), closed=True))
        turns.append({
            "user": pending_user, "policy_raw": text, "policy_reply": split.reply,
            "thought": split.thought, "think_closed": split.closed,
            **({} if record is None else {
                "emotion_before": record.emotion_before, "emotion_after": record.emotion_after,
                "delta": record.delta, "raw_delta": record.raw_delta,
                "parse_ok": record.parse_ok, "parse_failures": record.parse_failures,
                "analyzer": record.analyzer_text, "user_reply": record.user_reply}),
        })
        pending_user = None
    try:
        need = hidden_need_category(profile)
        kind = personality(profile)
    except (ValueError, AttributeError):
        need, kind = "other", "unknown"
    return {
        "step": step, "dialogue_id": state.dialogue_id, "profile_id": getattr(profile, "id", None),
        "need": need, "personality": kind, "final_emotion": state.emotion,
        "reward": DialogueRollout.final_reward(state) if reward is None else reward,
        "turns": state.turns,
        "done_reason": state.done_reason, "opening": state.history[0][1] if state.history else "",
        "dialogue": turns,
    }


def write_dialogues(path, states: Sequence[sim.DialogueState], step: int | None = None) -> None:
    """Appends one `dialogue_record` line per dialogue to a jsonl file (local or gs://)."""
    storage.append_text(path, "".join(json.dumps(dialogue_record(st, step), ensure_ascii=False)
                                      + "\n" for st in states))
