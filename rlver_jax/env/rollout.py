"""The batched multi-turn dialogue rollout: policy turns and simulated-user turns.

All live dialogues advance together: one batched policy generation, then one batched
analyzer call, then one batched actor call. Dialogues are keyed by a stable id and keep
their row in every batch for their whole life, so a reply can never reach the wrong
dialogue (the reference code routed replies by position in a shrinking list).

Training samples hold token ids exactly as sampled, never a re-tokenisation of text:
- no-think: one sample per dialogue, the whole conversation; loss mask 1 on the policy's
  generated tokens (content and its end-of-turn token), 0 on the system prompt, user turns
  and role headers; the KV cache carries over from turn to turn.
- think: one sample per policy turn (prompt = history with old thoughts removed, response =
  this turn's generation); every turn of a dialogue shares the final reward. The KV cache
  carries over too: each row rolls back to the end of its previous prompt (dropping the
  old thought) and appends the new turn.
The reward sits on the last policy token of each sample.

A policy turn cut at `max_turn_tokens` before its end-of-turn token is "truncated" (counted
in `rollout/truncated_turns`); `RolloutSettings.truncated_turn` decides what happens to it:
"pass" (the user reads the cut text, the turn is trained as sampled; no-think closes it
with an untrained end-of-turn token), "zero_reward" (the dialogue ends there with reward 0,
reason "truncated") or "mask" (the cut turn's tokens leave the loss, so the reward lands on
the last token of an earlier, complete turn; the dialogue goes on).

A GRPO group's first policy prompt (system prompt and the shared opening) is prefilled once
and copied into the group's rows (`Sampler.fork_groups`). `RolloutSummary.stats` is where
the rollout's token accounting lives: policy and simulator prompt tokens computed
(`*_prefill_tokens`) and served from a KV cache (`*_reused_tokens`), simulator tokens
generated, calls and truncations.

Multi-host: each process plays its own dialogues; when the policy sampler's mesh spans
processes, the loop runs in lock step (every process keeps calling the sampler, with no
rows of its own if need be, until no process has a live dialogue), and `RolloutSummary`
is what processes exchange to report metrics over all dialogues.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import numpy as np

from rlver_jax.env import simulator as sim
from rlver_jax.env.generation import Generator, any_process_of
from rlver_jax.env.users import mix_seed
from rlver_jax.tokenizer import THINK_OPEN


TRUNCATED_TURN_MODES = ("pass", "zero_reward", "mask")


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
    """How the policy side of a rollout runs."""

    think: bool = False
    group_size: int = 1                  # GRPO: dialogues per profile sharing the opening
    max_turn_tokens: int = 256           # policy tokens per reply
    max_dialogue_tokens: int = 4096      # whole training sequence (no-think) / prompt cap
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    unclosed_think: str = "pass"         # "pass" the raw text on, or "zero_reward"
    truncated_turn: str = "pass"         # a turn cut at max_turn_tokens: TRUNCATED_TURN_MODES

    def __post_init__(self):
        if self.unclosed_think not in ("pass", "zero_reward"):
            raise ValueError(f"unclosed_think={self.unclosed_think!r}: expected 'pass' or "
                             "'zero_reward'")
        if self.truncated_turn not in TRUNCATED_TURN_MODES:
            raise ValueError(f"truncated_turn={self.truncated_turn!r}: expected one of "
                             f"{TRUNCATED_TURN_MODES}")
        if self.group_size < 1:
            raise ValueError(f"group_size={self.group_size} must be >= 1")


@dataclasses.dataclass
class Sample:
    """One training sequence. Per-token lists are aligned with `tokens`; `logprobs` (under
    the sampling distribution) and `raw_logprobs` (plain model) are 0 off the loss mask."""

    dialogue_id: str
    group_id: int
    tokens: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    raw_logprobs: list[float]
    reward: float = 0.0
    turn: int = -1                       # think mode: the policy turn; -1 for whole dialogues


@dataclasses.dataclass
class _Track:
    """The policy-side token record of one dialogue."""

    tokens: list[int]
    mask: list[int]
    logprobs: list[float]
    raw: list[float]
    samples: list[Sample] = dataclasses.field(default_factory=list)
    policy_tokens: int = 0
    format_violations: int = 0

    def extend(self, ids: Sequence[int], mask: int = 0, logprobs=None, raw=None):
        self.tokens.extend(ids)
        self.mask.extend([mask] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))
        self.raw.extend(raw if raw is not None else [0.0] * len(ids))


# How a dialogue can end: the simulator's reasons, then the rollout's own.
END_REASONS = (*sim.TERMINATION_REASONS, "length", "format", "truncated")
# Dialogues that end for these reasons earn reward 0 whatever the emotion.
ZERO_REWARD_REASONS = ("format", "truncated")


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else 0.0


@dataclasses.dataclass
class RolloutSummary:
    """Per-dialogue outcomes of a rollout: what its metrics are computed from. Small and
    picklable, so processes can exchange theirs and report over all dialogues (`merge`)."""

    final_emotion: list[float]
    reward: list[float]
    turns: list[int]
    done_reason: list[str]
    policy_tokens: int
    samples: int
    stats: dict[str, int]

    @classmethod
    def merge(cls, parts: Sequence["RolloutSummary"]) -> "RolloutSummary":
        stats: dict[str, int] = {}
        for p in parts:
            for k, v in p.stats.items():
                stats[k] = stats.get(k, 0) + v
        return cls(final_emotion=[x for p in parts for x in p.final_emotion],
                   reward=[x for p in parts for x in p.reward],
                   turns=[x for p in parts for x in p.turns],
                   done_reason=[x for p in parts for x in p.done_reason],
                   policy_tokens=sum(p.policy_tokens for p in parts),
                   samples=sum(p.samples for p in parts), stats=stats)

    def metrics(self) -> dict[str, float]:
        final = np.asarray(self.final_emotion, np.float32)
        rewards = np.asarray(self.reward, np.float32)
        replies = sum(self.turns) or 1
        m = {
            "reward/mean": _mean(rewards),
            "reward/std": float(rewards.std()) if len(rewards) else 0.0,
            "emotion/final_mean": _mean(final),
            "emotion/success_frac": _mean(final >= sim.SUCCESS_EMOTION),
            "emotion/failure_frac": _mean(final < sim.FAILURE_EMOTION),
            "turns/mean": _mean(self.turns),
            "tokens/policy": float(self.policy_tokens),
            "tokens/per_reply": float(self.policy_tokens / replies),
            "dialogues": float(len(self.reward)),
            "samples": float(self.samples),
        }
        m.update({f"rollout/{k}": float(v) for k, v in self.stats.items()})
        for reason in END_REASONS:
            m[f"end/{reason}"] = _mean([r == reason for r in self.done_reason])
        return m


@dataclasses.dataclass
class RolloutResult:
    samples: list[Sample]
    dialogues: list[sim.DialogueState]
    timing: dict[str, float]
    summary: RolloutSummary

    @property
    def metrics(self) -> dict[str, float]:
        return self.summary.metrics()


class DialogueRollout:
    """Runs batches of dialogues between a policy model and a simulated user."""

    def __init__(self, tokenizer, user, sim_settings: sim.SimulatorSettings,
                 settings: RolloutSettings, sampler: Generator):
        self.tokenizer = tokenizer
        self.user = user
        self.sim_settings = sim_settings
        self.settings = settings
        self.sampler = sampler
        self._newline = tokenizer.encode("\n")
        self._assistant_prefix = tokenizer.assistant_prefix_ids()
        # Loop conditions are collective when the policy's mesh spans processes.
        self._any = any_process_of(sampler)

    # ------------------------------------------------------------------ policy turn
    def _policy_prompt(self, state: sim.DialogueState, track: _Track) -> list[int]:
        if self.settings.think:
            messages = sim.render_policy_messages(state.profile, state.history, True,
                                                  self.sim_settings)
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return track.tokens + self._assistant_prefix

    def _record_policy_turn(self, state, track: _Track, prompt: list[int], tokens, logprobs,
                            raw, stopped: bool, group_id: int) -> str:
        """Adds the sampled reply to the track (and think-mode sample); returns its text.

        A truncated turn under `truncated_turn="mask"` is kept with loss mask 0 (and zero
        log-probs): no think-mode sample, and no reward can land on it."""
        s = self.settings
        track.policy_tokens += len(tokens)
        trained = stopped or s.truncated_turn != "mask"
        if not trained:
            logprobs = raw = [0.0] * len(tokens)
        if s.think:
            if trained:
                sample = Sample(dialogue_id=state.dialogue_id, group_id=group_id,
                                tokens=list(prompt) + list(tokens),
                                loss_mask=[0] * len(prompt) + [1] * len(tokens),
                                logprobs=[0.0] * len(prompt) + list(logprobs),
                                raw_logprobs=[0.0] * len(prompt) + list(raw), turn=state.turns)
                track.samples.append(sample)
        else:
            track.extend(self._assistant_prefix)
            track.extend(tokens, int(trained), logprobs, raw)
            if not stopped:
                # Close the turn for the chat format; not a policy token, so not trained.
                track.extend([self.tokenizer.im_end_id])
            track.extend(self._newline)
        content = tokens[:-1] if stopped else tokens
        return self.tokenizer.decode(content, skip_special_tokens=True)

    # ---------------------------------------------------------------------- main loop
    def run(self, policy, profiles: Sequence[Any], seed: int, id_prefix: str = "d"
            ) -> RolloutResult:
        """Plays one dialogue per (profile, group member) to the end."""
        s, cfg = self.settings, self.sim_settings
        timing = {"policy_s": 0.0, "analyzer_s": 0.0, "actor_s": 0.0}
        states: list[sim.DialogueState] = []
        group_ids: list[int] = []
        for p_index, profile in enumerate(profiles):
            for g in range(s.group_size):
                states.append(sim.new_dialogue(f"{id_prefix}-{p_index}-{g}", profile, cfg,
                                               think=s.think))
                group_ids.append(p_index)
        by_id = {st.dialogue_id: st for st in states}
        if len(by_id) != len(states):
            raise ValueError("dialogue ids must be unique")

        user_counts = dict(getattr(self.user, "stats", {}))  # this run's share: the change
        # Openings: one per profile, shared by its group (GRPO compares like with like).
        t0 = time.perf_counter()
        heads = states[::s.group_size]
        openings = self.user.openings(heads, mix_seed(seed, 0))
        timing["actor_s"] += time.perf_counter() - t0
        tracks: dict[str, _Track] = {}
        for i, st in enumerate(states):
            sim.add_user_message(st, openings[i // s.group_size], cfg)
            system = sim.render_policy_messages(st.profile, [], s.think, cfg)[0]
            track = _Track([], [], [], [])
            track.extend(self.tokenizer.render_turn("system", system["content"]))
            track.extend(self.tokenizer.render_turn("user", st.history[-1][1]))
            tracks[st.dialogue_id] = track

        previous = None
        turn = 0
        stats = {"parse_failures": 0, "analyzer_fallbacks": 0, "actor_fallbacks": 0,
                 "format_violations": 0, "length_stops": 0, "truncated_turns": 0,
                 "policy_prefill_tokens": 0, "policy_reused_tokens": 0}
        while True:
            live = [i for i, st in enumerate(states) if not st.done]
            if not self._any(live):
                break
            turn += 1
            # ---- policy: one batched generation; rows are fixed per dialogue
            prompts: list[list[int] | None] = [None] * len(states)
            for i in live:
                st = states[i]
                prompts[i] = self._policy_prompt(st, tracks[st.dialogue_id])
            too_long = [i for i in live if len(prompts[i]) + s.max_turn_tokens
                        > s.max_dialogue_tokens]
            for i in too_long:
                st = states[i]
                st.done, st.done_reason = True, "length"
                stats["length_stops"] += 1
                prompts[i] = None
            live = [i for i in live if prompts[i] is not None]
            if not self._any(live):
                break
            t0 = time.perf_counter()
            forked = 0
            if (previous is None and s.group_size > 1 and all(p is not None for p in prompts)
                    and hasattr(self.sampler, "fork_groups")):
                # The group's rows start from the same prompt: prefill it once per group.
                previous, forked = self.sampler.fork_groups(policy, prompts, group_ids)
            out = self.sampler.generate(
                policy, prompts, s.max_turn_tokens, temperature=s.temperature, top_p=s.top_p,
                top_k=s.top_k, stop_token_ids=self.tokenizer.eos_ids, seed=mix_seed(seed, turn, 1),
                previous=previous, keep_state=True)
            timing["policy_s"] += time.perf_counter() - t0
            previous = out.state
            prompt_tokens = sum(len(prompts[i]) for i in live)
            # A sampler that does not count (a test double) computed every prompt token.
            prefilled = getattr(out, "prefill_tokens", None)
            computed = prompt_tokens if prefilled is None else forked + prefilled
            stats["policy_prefill_tokens"] += computed
            stats["policy_reused_tokens"] += prompt_tokens - computed
            replies = {}
            for i in live:
                st = states[i]
                track = tracks[st.dialogue_id]
                text = self._record_policy_turn(st, track, prompts[i], out.tokens[i],
                                                out.logprobs[i], out.raw_logprobs[i],
                                                out.stopped[i], group_ids[i])
                if not out.stopped[i]:
                    stats["truncated_turns"] += 1
                    if s.truncated_turn == "zero_reward":
                        # Ends before the user reads the cut text (like a format stop).
                        sim.add_policy_reply(st, text)
                        replies[i] = text
                        st.done, st.done_reason = True, "truncated"
                        continue
                unclosed = s.think and not sim.split_think(text).closed
                if unclosed and s.unclosed_think == "pass":
                    # The user reads the raw text (minus the dangling tag) instead of the
                    # empty reply after an unclosed thought.
                    text = text.replace(THINK_OPEN, "").strip()
                sim.add_policy_reply(st, text)
                replies[i] = text
                if unclosed:
                    track.format_violations += 1
                    stats["format_violations"] += 1
                    if s.unclosed_think == "zero_reward":
                        st.done, st.done_reason = True, "format"
            live = [i for i in live if not states[i].done]
            if not self._any(live):
                break

            # ---- simulated user: analyzer (emotion change), then actor (reply)
            t0 = time.perf_counter()
            analyses = self.user.analyze([states[i] for i in live], [replies[i] for i in live],
                                         mix_seed(seed, turn, 2))
            timing["analyzer_s"] += time.perf_counter() - t0
            for i, a in zip(live, analyses):
                stats["parse_failures"] += a.parse_failures
                stats["analyzer_fallbacks"] += int(not a.parse_ok)
                sim.apply_analysis(states[i], a.delta, cfg, raw_delta=a.raw_delta,
                                   parse_ok=a.parse_ok, parse_failures=a.parse_failures,
                                   analyzer_text=a.text)
            analysis_of = dict(zip(live, analyses))
            live = [i for i in live if not states[i].done]
            if not self._any(live):
                break
            t0 = time.perf_counter()
            user_replies = self.user.replies([states[i] for i in live],
                                             [analysis_of[i] for i in live],
                                             mix_seed(seed, turn, 3))
            timing["actor_s"] += time.perf_counter() - t0
            for i, r in zip(live, user_replies):
                st = states[i]
                stats["parse_failures"] += r.parse_failures
                stats["actor_fallbacks"] += int(not r.parse_ok)
                sim.add_user_message(st, r.text, cfg)
                if not st.done and not s.think:
                    tracks[st.dialogue_id].extend(self.tokenizer.render_turn("user", r.text))

        if hasattr(self.user, "release"):
            self.user.release()  # its caches are not needed past the rollout
        for key, value in getattr(self.user, "stats", {}).items():
            stats[key] = value - user_counts.get(key, 0)
        samples = self._finish(states, tracks, group_ids)
        summary = RolloutSummary(
            final_emotion=[float(st.emotion) for st in states],
            reward=[self.final_reward(st) for st in states],
            turns=[st.turns for st in states], done_reason=[st.done_reason for st in states],
            policy_tokens=sum(t.policy_tokens for t in tracks.values()),
            samples=len(samples), stats=dict(stats))
        return RolloutResult(samples=samples, dialogues=states, timing=timing, summary=summary)

    # ------------------------------------------------------------------ outputs
    @staticmethod
    def final_reward(st: sim.DialogueState) -> float:
        """The dialogue's reward: final emotion / 100, or 0 when it ended for format or on a
        truncated turn (ZERO_REWARD_REASONS)."""
        return 0.0 if st.done_reason in ZERO_REWARD_REASONS else float(st.reward)

    def _finish(self, states, tracks, group_ids) -> list[Sample]:
        samples = []
        for st, g in zip(states, group_ids):
            track = tracks[st.dialogue_id]
            r = self.final_reward(st)
            if self.settings.think:
                for sample in track.samples:
                    sample.reward = r
                    samples.append(sample)
            elif any(track.mask):
                samples.append(Sample(dialogue_id=st.dialogue_id, group_id=g,
                                      tokens=track.tokens, loss_mask=track.mask,
                                      logprobs=track.logprobs, raw_logprobs=track.raw,
                                      reward=r))
        return samples
