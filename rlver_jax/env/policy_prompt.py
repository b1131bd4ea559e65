"""The policy's side of the prompt: its chat messages and its think tags.

In think mode the policy writes <think>...</think> before each reply; only the text after the
last </think> is the reply that the simulated user reads and that later turns show again.
The tag strings are the tokenizer's (`rlver_jax.tokenizer.THINK_OPEN` / `THINK_CLOSE`): the
tiny vocab holds each as one token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from rlver_jax.env.sim_parse import as_text
from rlver_jax.env.sim_settings import LANGUAGES, SimulatorSettings, detect_language, resolve_language
from rlver_jax.env.templates import load_template
from rlver_jax.tokenizer import THINK_CLOSE, THINK_OPEN

__all__ = ["THINK_CLOSE", "THINK_OPEN", "ThinkSplit", "render_policy_messages", "split_think", "visible_reply"]


@dataclasses.dataclass(frozen=True)
class ThinkSplit:
    """A policy generation split at its last </think>. `closed` is False when a <think> was
    opened and never closed (the unfinished thought is in `thought`, not in `reply`)."""

    thought: str
    reply: str
    closed: bool



def split_think(text: Any) -> ThinkSplit:
    """Splits a generation into thought and reply. Never raises.

    reply = the text after the LAST </think> (the whole text when there is none), stripped.
    A <think> opened after the last </think> (or with no </think> at all) is unclosed: it
    and everything after it go to `thought` and `closed` is False.
    """
    raw = as_text(text)
    try:
        cut = raw.rfind(THINK_CLOSE)
        if cut >= 0:
            thought = raw[:cut]
            reply = raw[cut + len(THINK_CLOSE):]
        else:
            thought, reply = "", raw
        closed = True
        opened = reply.find(THINK_OPEN)
        if opened >= 0:
            thought = thought + reply[opened:]
            reply = reply[:opened]
            closed = False
        # Tags become line breaks so that separate thought segments do not run together.
        thought = thought.replace(THINK_OPEN, "\n").replace(THINK_CLOSE, "\n").strip()
        return ThinkSplit(thought=thought, reply=reply.strip(), closed=closed)
    except Exception:
        return ThinkSplit(thought="", reply="", closed=False)


def visible_reply(text: str, think: bool = True) -> str:
    """What the simulated user sees of a policy reply.

    In think mode only what follows the last </think>; without it the reply is shown whole,
    because there a stray tag must not hide the rest.
    """
    return split_think(text).reply if think else as_text(text).strip()


def render_policy_messages(
    profile: Any | None,
    history: Sequence[tuple[str, str]],
    think: bool,
    settings_or_lang: SimulatorSettings | str | None = None,
) -> list[dict[str, str]]:
    """The policy's chat: system prompt, then the dialogue as user / assistant turns.

    The profile is used only to pick the language ("auto"); the policy never sees persona,
    scene or hidden need. In think mode the system prompt asks for <think>...</think> before
    each reply and past assistant turns keep only the text after their last </think>;
    without think mode assistant turns are passed as generated.
    """
    if isinstance(settings_or_lang, SimulatorSettings):
        setting = settings_or_lang.language
    else:
        setting = settings_or_lang
    if setting in LANGUAGES:
        lang = setting
    elif profile is not None:
        lang = resolve_language(profile, "auto")
    else:
        # Nothing names the language: follow the dialogue itself.
        lang = detect_language(" ".join(text for _, text in history))
    system = load_template(f"policy_system_{lang}")[0]
    if think:
        system = f"{system}\n\n{load_template(f'policy_think_{lang}')[0]}"
    messages = [{"role": "system", "content": system}]
    for role, text in history:
        if role not in ("user", "assistant"):
            raise ValueError(f"history role must be 'user' or 'assistant', got {role!r}")
        content = split_think(text).reply if (think and role == "assistant") else text
        messages.append({"role": role, "content": content})
    return messages
