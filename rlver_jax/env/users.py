"""Simulated-user backends with one batched interface for the rollout.

`LLMUser` runs the simulator model in process through the project's sampler: one batched
generation for every live dialogue's analyzer call, then one for every actor call, with
parse retries (new seed) for the rows that failed. It keeps the KV cache of both calls
(two streams) per dialogue row, keyed by dialogue id: the prompts put what never changes
first and the transcript only grows, so each call prefills only the new transcript lines
and the per-turn tail; a retry rolls back to the end of its prompt; the rows of a GRPO
group share one prefill of their common head (`Sampler.fork_groups`). `RuleUser` wraps
the TOY `rule` judge (lexicon scoring, template replies) behind the same interface for CPU
demos and tests.

Both return, per dialogue, an `Analysis` (the emotion change to apply) and then a user
message; they never modify dialogue state (the rollout does the bookkeeping).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from rlver_jax.env import simulator as sim
from rlver_jax.env.generation import Generator, any_process_of
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
    reuse_cache: bool = True             # False: every call prefills its whole prompt


# A prompt over `max_prompt_tokens` loses whole oldest transcript turns until it is at most
# this fraction of the cap: the slack lets the next turns extend the shortened prompt
# (keeping the cache) instead of shortening it, and re-prefilling, every turn.
TRUNCATE_TO_FRACTION = 0.75
# One transcript turn: a user message and the policy's reply.
MESSAGES_PER_TURN = 2

# The LLM user's counters (cumulative; the rollout reports their change per run).
STAT_KEYS = ("simulator_tokens", "simulator_calls", "simulator_prefill_tokens",
             "simulator_reused_tokens", "simulator_truncations")


@dataclasses.dataclass
class _Stream:
    """One kind of simulator call (analyzer or actor) over a set of dialogues: the sampler
    state it continues and, per dialogue id, its row and how many of its oldest history
    messages truncation has left out (only ever grows, so prompts keep extending)."""

    rows: dict[str, int] = dataclasses.field(default_factory=dict)
    state: Any = None
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)


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
    """The simulator LLM in process: batched analyzer and actor generations, each
    continuing its own per-dialogue KV cache (`SimulatorSampling.reuse_cache`)."""

    name = "llm"

    def __init__(self, settings: sim.SimulatorSettings, model, tokenizer, sampler: Generator,
                 sampling: SimulatorSampling = SimulatorSampling()):
        self.settings = settings
        self.model = model
        self.tokenizer = tokenizer
        self.sampler = sampler
        self.sampling = sampling
        self.stats = {k: 0 for k in STAT_KEYS}
        self._streams = {"analyzer": _Stream(), "actor": _Stream()}
        # Multi-host: every process must make the same simulator calls (see the sampler),
        # so "is there work left" is decided over all processes.
        self._multiprocess = getattr(sampler, "multiprocess", False)
        self._any = any_process_of(sampler)

    def release(self) -> None:
        """Drops the kept caches (the rollout calls it when its dialogues are over, so the
        simulator's KV memory is not held through the update)."""
        self._streams = {name: _Stream() for name in self._streams}

    # ---------------------------------------------------------------- prompts
    def _prompt(self, stream: _Stream, key: str, render: Callable[[int], list | None]
                ) -> list[int]:
        """Token ids of a row's prompt. `render(k)` gives the messages with the k oldest
        history messages left out (None when there are not that many). Over the cap, whole
        oldest turns go (the static head stays); as a last resort the middle is cut."""
        limit = self.sampling.max_prompt_tokens
        drop = stream.dropped.get(key, 0)
        ids = self.tokenizer.apply_chat_template(render(drop), add_generation_prompt=True)
        if len(ids) > limit:
            target = int(limit * TRUNCATE_TO_FRACTION)
            while len(ids) > target:
                messages = render(drop + MESSAGES_PER_TURN)
                if messages is None:
                    break
                drop += MESSAGES_PER_TURN
                ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            stream.dropped[key] = drop
            self.stats["simulator_truncations"] += 1
        if len(ids) > limit:
            # Nothing left to drop: keep the head (instructions, persona) and the newest part.
            ids = ids[:limit // 2] + ids[-(limit - limit // 2):]
        return ids

    # ---------------------------------------------------------------- generation
    def _generate(self, stream: _Stream, keys: Sequence[str], prompts: Sequence[list[int]],
                  heads: Sequence[str], max_new: int, seed: int) -> list[str]:
        """One batched generation for the rows of `keys`, continuing the stream's cache.
        `heads[i]` names row i's static head (rows with the same one share its prefill)."""
        s = self.sampling
        kwargs = dict(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                      stop_token_ids=self.tokenizer.eos_ids, seed=seed)
        if not s.reuse_cache:
            # The same capped-stream programs as with reuse (block prefill, one capacity),
            # so the comparison differs only in what is reused, not in what compiles.
            out = self.sampler.generate(self.model, list(prompts), max_new,
                                        max_prompt_tokens=s.max_prompt_tokens, **kwargs)
            tokens, forked = out.tokens, 0
        else:
            forked = 0
            if any(k not in stream.rows for k in keys):
                # New dialogues: the stream starts over with this call's rows.
                stream.rows = {k: i for i, k in enumerate(keys)}
                stream.dropped = {k: stream.dropped.get(k, 0) for k in keys}
                stream.state = None
                if not self._multiprocess and hasattr(self.sampler, "fork_groups"):
                    stream.state, forked = self.sampler.fork_groups(
                        self.model, prompts, heads, max_prompt_tokens=s.max_prompt_tokens,
                        max_new_tokens=max_new)
            rows: list[list[int] | None] = [None] * len(stream.rows)
            for k, p in zip(keys, prompts):
                rows[stream.rows[k]] = p
            # The prompt cap bounds every call: the cache is sized for it from the first
            # call, so growing dialogues reuse one set of compiled programs.
            out = self.sampler.generate(self.model, rows, max_new, previous=stream.state,
                                        keep_state=True, max_prompt_tokens=s.max_prompt_tokens,
                                        **kwargs)
            stream.state = out.state
            tokens = [out.tokens[stream.rows[k]] for k in keys]
        # Reused: prompt tokens not computed (a group's shared head is computed once).
        prompt_tokens = sum(len(p) for p in prompts)
        computed = (prompt_tokens if out.prefill_tokens is None
                    else forked + out.prefill_tokens)
        self.stats["simulator_prefill_tokens"] += computed
        self.stats["simulator_reused_tokens"] += prompt_tokens - computed
        self.stats["simulator_tokens"] += sum(len(t) for t in tokens)
        self.stats["simulator_calls"] += 1
        return [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]

    def _with_retries(self, stream_name: str, states: Sequence[sim.DialogueState],
                      render: Callable[[int, int], list | None], max_new, seed, parse,
                      languages=None):
        """Generates for every row, re-sampling (new seed) the rows that did not parse: a
        retry repeats its prompt, which the cache holds up to its last token.
        `render(i, k)`: row i's messages without the k oldest history messages;
        `languages[i]` picks the language of row i's fallback reply."""
        stream = self._streams[stream_name]
        keys = [st.dialogue_id for st in states]
        prompts, heads = [], []
        for i, key in enumerate(keys):
            prompts.append(self._prompt(stream, key, lambda k, i=i: render(i, k)))
            heads.append(render(i, 0)[0]["content"])
        attempts: list[list[Any]] = [[] for _ in states]
        decisions: list[sim.RetryDecision | None] = [None] * len(states)
        pending = list(range(len(states)))
        round_ = 0
        while self._any(pending):
            texts = self._generate(stream, [keys[i] for i in pending],
                                   [prompts[i] for i in pending], [heads[i] for i in pending],
                                   max_new, mix_seed(seed, round_))
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
            chosen = [states[i] for i in need]

            def render(i, drop):
                if drop:
                    return None  # no transcript yet
                st = chosen[i]
                return sim.render_actor_prompt(st.profile, [], None, sim.emotion_level(st.emotion),
                                               self.settings)

            langs = [sim.resolve_language(st.profile, self.settings) for st in chosen]
            _, decisions = self._with_retries("actor", chosen, render,
                                              self.sampling.max_actor_tokens, seed,
                                              sim.parse_actor, langs)
            for i, d in zip(need, decisions):
                out[i] = d.reply
        return [o or "" for o in out]

    def analyze(self, states: Sequence[sim.DialogueState], replies: Sequence[str], seed: int
                ) -> list[Analysis]:
        def render(i, drop):
            st = states[i]
            history = st.history[:-1]  # the reply itself is the last entry
            # Keep the user's newest message: the reply answers it.
            if drop > max(len(history) - 1, 0):
                return None
            return sim.render_analyzer_prompt(st.profile, history[drop:], replies[i],
                                              st.emotion, self.settings, think=st.think)

        attempts, decisions = self._with_retries("analyzer", states, render,
                                                 self.sampling.max_analyzer_tokens, seed,
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
        def render(i, drop):
            st = states[i]
            # Keep the newest user message and policy reply: the actor answers them.
            if drop > max(len(st.history) - MESSAGES_PER_TURN, 0):
                return None
            return sim.render_actor_prompt(st.profile, st.history[drop:], analyses[i].text,
                                           sim.emotion_level(st.emotion), self.settings,
                                           think=st.think)

        langs = [sim.resolve_language(s.profile, self.settings) for s in states]
        _, decisions = self._with_retries("actor", states, render,
                                          self.sampling.max_actor_tokens, seed,
                                          sim.parse_actor, langs)
        return [UserReply(d.reply or "", d.action == "accept", d.failures) for d in decisions]
