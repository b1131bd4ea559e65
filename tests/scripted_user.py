"""Generation doubles for driving the real `LLMUser` (and the rollout) without a model.

`ScriptedGenerator` has the sampler's `generate(model, prompts, max_new_tokens, ...)`
interface and nothing else: it decodes each prompt, asks a `respond` function for the text
to "generate", and returns it encoded like a sampler's output (cut at `max_new_tokens`, cut
after the first stop token, `stopped` False when the cut came first). Keyword arguments it
does not know (continuation state, cache options) are accepted and ignored, so the double
keeps working when the sampler's interface grows.

`ScriptedSimulator` is that generator behind `LLMUser`: every call is routed by what its
PROMPT says, never by its position in the batch. The dialogue comes from a tag in the
prompt text (`dialogue_tag(key)` written into the profile's persona, shown in every
simulator prompt); the call's kind from its token budget (`max_analyzer_tokens` vs
`max_actor_tokens` of the `SimulatorSampling` it serves, which must differ). Planned texts
are consumed per (dialogue, kind) in call order; `prompts[(key, kind)]` keeps every prompt.

Typical use:

    sampling = SimulatorSampling(max_analyzer_tokens=96, max_actor_tokens=64)
    double = ScriptedSimulator(tok, sampling, plan={"a": {"analyzer": [...], "actor": [...]}})
    user = LLMUser(settings, None, tok, double, sampling)
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping, Sequence

from rlver_jax.env.profiles import Profile
from rlver_jax.sampling import SampleOutput

_TAG_RE = re.compile(r"\[dlg:([A-Za-z0-9_-]+)\]")


def dialogue_tag(key: str) -> str:
    """The marker that identifies a dialogue inside any prompt that shows its persona."""
    return f"[dlg:{key}]"


def tagged_profile(key: str, *, first_talk: str | None = None) -> Profile:
    """A small English profile whose persona carries `dialogue_tag(key)`."""
    return Profile(id=f"p-{key}", player=f"Sam {dialogue_tag(key)}, 30, a baker who loves jazz.",
                   scene="Sam's bakery may close; Sam wants to be told it is not Sam's fault.",
                   main_cha="negative", cha_group=("proud", "tired", "honest"),
                   task="being told they did nothing wrong", first_talk=first_talk)


class ScriptedGenerator:
    """The sampler's `generate` with chosen texts: `respond(row, prompt_text, max_new)`
    returns the text of one row (append the end-of-turn token to make it "stop")."""

    def __init__(self, tokenizer, respond: Callable[[int, str, int], str]):
        self.tok = tokenizer
        self.respond = respond
        self.calls = 0

    def generate(self, model, prompts, max_new_tokens, *, stop_token_ids=(), **unused):
        tokens, lps, raws, stopped = [], [], [], []
        for row, prompt in enumerate(prompts):
            ids: list[int] = []
            stop = False
            if prompt is not None:
                text = self.respond(row, self.tok.decode(prompt), max_new_tokens)
                ids = self.tok.encode(text, allow_special=True)[:max_new_tokens]
                for k, t in enumerate(ids):
                    if t in stop_token_ids:
                        ids, stop = ids[:k + 1], True
                        break
            tokens.append(ids)
            # Distinct made-up numbers, so that their alignment can be checked.
            lps.append([-0.01 * (k + 1) - row for k in range(len(ids))])
            raws.append([-0.02 * (k + 1) - row for k in range(len(ids))])
            stopped.append(stop)
        self.calls += 1
        return SampleOutput(tokens, lps, raws, stopped, state=None)


@dataclasses.dataclass
class Served:
    """One simulator row as the double saw and answered it."""

    key: str
    kind: str        # "analyzer" | "actor" (openings are actor calls)
    index: int       # the n-th call of this kind for this dialogue
    prompt: str
    text: str


class ScriptedSimulator(ScriptedGenerator):
    """Planned simulator texts per dialogue and per call, routed by the prompt's content.

    `plan[key][kind]` is a list of texts (or a function `(index, prompt) -> text`); a call
    beyond the list repeats its last text. `route="position"` reproduces the reference
    code's fault for tests of the tests: the k-th row of a call is answered as the k-th
    dialogue of the first call, whatever its prompt says.
    """

    def __init__(self, tokenizer, sampling, plan: Mapping[str, Mapping[str, object]],
                 end_token: str = "<|im_end|>", route: str = "prompt"):
        if sampling.max_analyzer_tokens == sampling.max_actor_tokens:
            raise ValueError("ScriptedSimulator tells the calls apart by their token budget: "
                             "max_analyzer_tokens and max_actor_tokens must differ")
        super().__init__(tokenizer, self._respond)
        self.sampling = sampling
        self.plan = plan
        self.end_token = end_token
        self.route = route
        self.counts: dict[tuple[str, str], int] = {}
        self.served: list[Served] = []
        self._first_keys: list[str] | None = None
        self._row_keys: list[str] = []

    def generate(self, model, prompts, max_new_tokens, **kwargs):
        keys = [self.key_of(self.tok.decode(p)) if p is not None else "" for p in prompts]
        if self._first_keys is None:
            self._first_keys = keys
        self._row_keys = keys if self.route == "prompt" else self._first_keys[:len(keys)]
        return super().generate(model, prompts, max_new_tokens, **kwargs)

    @staticmethod
    def key_of(prompt_text: str) -> str:
        found = _TAG_RE.findall(prompt_text)
        if not found:
            raise AssertionError("a simulator prompt without a dialogue tag (the persona "
                                 "must be shown in every simulator prompt)")
        return found[0]

    def kind_of(self, max_new: int) -> str:
        return "analyzer" if max_new == self.sampling.max_analyzer_tokens else "actor"

    def _respond(self, row: int, prompt: str, max_new: int) -> str:
        key, kind = self._row_keys[row], self.kind_of(max_new)
        index = self.counts.get((key, kind), 0)
        self.counts[key, kind] = index + 1
        planned = self.plan[key][kind]
        if callable(planned):
            text = planned(index, prompt)
        else:
            text = planned[min(index, len(planned) - 1)]
        self.served.append(Served(key, kind, index, prompt, text))
        return text + self.end_token

    def prompts(self, key: str, kind: str) -> list[str]:
        return [s.prompt for s in self.served if s.key == key and s.kind == kind]


def analysis(delta: int | str, note: str = "ok") -> str:
    """An English analyzer output with the five fields; `delta` as written ("+7", "???")."""
    change = f"{delta:+d}" if isinstance(delta, int) else delta
    return (f"Intent: {note}\nFit: fair\nInner reaction: {note}\nFeeling: {note}\n"
            f"Emotion change: {change}")


def actor_reply(message: str) -> str:
    """An English actor output whose final reply is `message`."""
    return f"Thinking: hm\nDraft: {message}\nMake it realistic: shorter\nFinal reply: {message}"


UNPARSABLE_ANALYSIS = "Intent: unclear\nFeeling: no idea what to say"
UNPARSABLE_ACTOR = "Thinking: I cannot decide what to say"


def visible_turns(history: Sequence[tuple[str, str]], role: str) -> list[str]:
    return [text for r, text in history if r == role]
