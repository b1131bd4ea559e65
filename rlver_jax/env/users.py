"""Simulated-user backends with one batched interface for the rollout.

`LLMUser` runs the simulator model in process through the project's sampler: one batched
generation for every live dialogue's analyzer call, then one for every actor call, with
parse retries (new seed) for the rows that failed. `RuleUser` wraps the TOY `rule` judge
(lexicon scoring, template replies) behind the same interface for CPU demos and tests.

Both return, per dialogue, an `Analysis` (the emotion change to apply) and then a user
message; they never modify dialogue state (the rollout does the bookkeeping).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from rlver_jax import distributed
from rlver_jax.env import simulator as sim
from rlver_jax.env.rule_judge import RuleJudge


@dataclasses.dataclass(frozen=True)
class Analysis:
    """One analyzer step's outcome: the change to apply and how it was obtained."""

    delta: int
    raw_delta: int | None
    parse_ok: bool
    parse_failures: int
    text: str


@dataclasses.dataclass(frozen=True)
class UserReply:
    text: str
    parse_ok: bool
    parse_failures: int


@dataclasses.dataclass(frozen=True)
class SimulatorSampling:
    """Sampling settings of the simulator model's two calls."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    max_analyzer_tokens: int = 384
    max_actor_tokens: int = 256
    max_prompt_tokens: int = 8192


def mix_seed(*parts: int) -> int:
    """A deterministic 31-bit seed from integers (stable across processes, unlike hash())."""
    h = 0x345678
    for p in parts:
        h = (h * 1_000_003) ^ (int(p) & 0xFFFFFFFF)
        h &= 0x7FFFFFFF
    return h


class RuleUser:
    """The TOY rule-based user (`rule` judge): deterministic, no model."""

    name = "rule"

    def __init__(self, settings: sim.SimulatorSettings):
        self.settings = settings
        self.judge = RuleJudge(settings)

    def openings(self, states: Sequence[sim.DialogueState], seed: int) -> list[str]:
        return [self.judge.opening(s.profile, seed) for s in states]

    def analyze(self, states: Sequence[sim.DialogueState], replies: Sequence[str], seed: int
                ) -> list[Analysis]:
        out = []
        for state, reply in zip(states, replies):
            history = state.history[:-1]  # the reply itself is the last entry
            result = self.judge.analyze(state.profile, history, reply)
            out.append(Analysis(delta=result.delta, raw_delta=result.delta, parse_ok=True,
                                parse_failures=0, text=result.raw))
        return out

    def replies(self, states: Sequence[sim.DialogueState], analyses: Sequence[Analysis],
                seed: int) -> list[UserReply]:
        return [UserReply(self.judge.user_reply(s.profile, s, seed), True, 0) for s in states]


class LLMUser:
    """The simulator LLM in process: batched analyzer and actor generations."""

    name = "llm"

    def __init__(self, settings: sim.SimulatorSettings, model, tokenizer, sampler,
                 sampling: SimulatorSampling = SimulatorSampling()):
        self.settings = settings
        self.model = model
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.sampling = sampling
        self.stats = {"simulator_tokens": 0, "simulator_calls": 0}
        # Multi-host: every process must make the same simulator calls (see the sampler),
        # so "is there work left" is decided over all processes.
        self._any = (distributed.any_process if getattr(sampler, "multiprocess", False)
                     else bool)

    def _generate(self, messages: Sequence[list[dict[str, str]]], max_new: int, seed: int
                  ) -> list[str]:
        prompts = []
        for m in messages:
            ids = self.tokenizer.apply_chat_template(m, add_generation_prompt=True)
            # Keep the head (instructions, persona) and the newest part of a long transcript.
            limit = self.sampling.max_prompt_tokens
            if len(ids) > limit:
                ids = ids[:limit // 2] + ids[-(limit - limit // 2):]
            prompts.append(ids)
        s = self.sampling
        out = self.sampler.generate(self.model, prompts, max_new, temperature=s.temperature,
                                    top_p=s.top_p, top_k=s.top_k,
                                    stop_token_ids=self.tokenizer.eos_ids, seed=seed)
        self.stats["simulator_tokens"] += sum(len(t) for t in out.tokens)
        self.stats["simulator_calls"] += 1
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in out.tokens]

    def _with_retries(self, messages, max_new, seed, parse, languages=None):
        """Generates for every row, re-sampling (new seed) the rows that did not parse.
        `languages[i]` picks the language of row i's fallback reply."""
        attempts: list[list[Any]] = [[] for _ in messages]
        decisions: list[sim.RetryDecision | None] = [None] * len(messages)
        pending = list(range(len(messages)))
        round_ = 0
        while self._any(pending):
            texts = self._generate([messages[i] for i in pending], max_new,
                                   mix_seed(seed, round_))
            still = []
            for i, text in zip(pending, texts):
                attempts[i].append(parse(text))
                language = languages[i] if languages else "en"
                decision = sim.decide_retry(attempts[i], self.settings, language)
                if decision.action == "retry":
                    still.append(i)
                else:
                    decisions[i] = decision
            pending = still
            round_ += 1
        return attempts, decisions

    def openings(self, states: Sequence[sim.DialogueState], seed: int) -> list[str]:
        out: list[str | None] = [None] * len(states)
        need = []
        for i, s in enumerate(states):
            first_talk = getattr(s.profile, "first_talk", None)
            if self.settings.use_first_talk and first_talk and first_talk.strip():
                out[i] = first_talk
            else:
                need.append(i)
        if self._any(need):
            msgs = [sim.render_actor_prompt(states[i].profile, [], None,
                                            sim.emotion_level(states[i].emotion), self.settings)
                    for i in need]
            langs = [sim.resolve_language(states[i].profile, self.settings) for i in need]
            _, decisions = self._with_retries(msgs, self.sampling.max_actor_tokens, seed,
                                              sim.parse_actor, langs)
            for i, d in zip(need, decisions):
                out[i] = d.reply
        return [o or "" for o in out]

    def analyze(self, states: Sequence[sim.DialogueState], replies: Sequence[str], seed: int
                ) -> list[Analysis]:
        msgs = [sim.render_analyzer_prompt(s.profile, s.history[:-1], reply, s.emotion,
                                           self.settings, think=s.think)
                for s, reply in zip(states, replies)]
        attempts, decisions = self._with_retries(msgs, self.sampling.max_analyzer_tokens, seed,
                                                 sim.parse_analyzer)
        out = []
        for tries, d in zip(attempts, decisions):
            last = tries[-1]
            out.append(Analysis(delta=int(d.delta), raw_delta=last.delta if last.ok else None,
                                parse_ok=d.action == "accept", parse_failures=d.failures,
                                text=last.raw))
        return out

    def replies(self, states: Sequence[sim.DialogueState], analyses: Sequence[Analysis],
                seed: int) -> list[UserReply]:
        msgs = [sim.render_actor_prompt(s.profile, s.history, a.text,
                                        sim.emotion_level(s.emotion), self.settings,
                                        think=s.think)
                for s, a in zip(states, analyses)]
        langs = [sim.resolve_language(s.profile, self.settings) for s in states]
        _, decisions = self._with_retries(msgs, self.sampling.max_actor_tokens, seed,
                                          sim.parse_actor, langs)
        return [UserReply(d.reply or "", d.action == "accept", d.failures) for d in decisions]
