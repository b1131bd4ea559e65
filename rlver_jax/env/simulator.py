"""The simulated user of RLVER as pure Python: settings, emotion state, prompts and parsing.

No model is called here. The dialogue rollout renders prompts with the functions below, runs
the batched sampler on them and hands the generated text back to the parsers. One user turn
is two simulator calls (see RLVER.md):

1. Analyzer (`render_analyzer_prompt` -> sampler -> `parse_analyzer`): five labelled fields,
   the last a signed integer emotion change.
2. Actor (`render_actor_prompt` -> sampler -> `parse_actor`): four labelled fields, the last
   the user's message. With an empty history the actor writes the opening message.

State per dialogue lives in `DialogueState`, keyed by a stable `dialogue_id` so that replies
can never be routed to the wrong dialogue when others finish early (a fault of the reference
code). The typical order of calls for one dialogue:

    state = new_dialogue(dialogue_id, profile, settings)
    add_user_message(state, opening, settings)
    while not state.done:
        add_policy_reply(state, policy_text)          # raw generation, thoughts included
        ... analyzer attempts -> decide_retry(...) -> apply_analysis(state, delta, settings, ...)
        if state.done: break                          # emotion bound or turn limit
        ... actor attempts -> decide_retry(...) -> add_user_message(state, reply, settings)

The parts live in their own modules and are all importable from here:

    sim_settings   SimulatorSettings, difficulty presets, emotion levels, languages
    emotion        DialogueState and the emotion state machine, termination, retries
    sim_prompts    the analyzer's and the actor's prompts (wording in prompts/*.txt)
    sim_parse      parse_analyzer, parse_actor, contains_goodbye
    policy_prompt  the policy's chat messages and think tags (split_think)
"""

from __future__ import annotations

from rlver_jax.env.emotion import (
    FALLBACK_USER_REPLY,
    TERMINATION_REASONS,
    DialogueState,
    RetryDecision,
    TurnRecord,
    add_policy_reply,
    add_user_message,
    apply_analysis,
    apply_delta,
    decide_retry,
    emotion_level,
    new_dialogue,
    reward,
    termination_reason,
)
from rlver_jax.env.policy_prompt import (
    THINK_CLOSE,
    THINK_OPEN,
    ThinkSplit,
    render_policy_messages,
    split_think,
    visible_reply,
)
from rlver_jax.env.sim_parse import (
    ACTOR_FIELDS,
    ANALYZER_FIELDS,
    MAX_PARSED_ABS_DELTA,
    ActorResult,
    AnalyzerResult,
    contains_goodbye,
    parse_actor,
    parse_analyzer,
)
from rlver_jax.env.sim_prompts import render_actor_prompt, render_analyzer_prompt
from rlver_jax.env.sim_settings import (
    DEFAULT_GOODBYE_WORDS,
    DIFFICULTY_PRESETS,
    EMOTION_LEVELS,
    EMOTION_MAX,
    FAIL_LEVEL,
    FAILURE_EMOTION,
    LANGUAGE_CHOICES,
    LANGUAGES,
    RESERVE_LEVELS,
    SUCCESS_EMOTION,
    SimulatorSettings,
    goodbye_word,
    resolve_language,
    settings_from_config,
)
from rlver_jax.env.templates import TEMPLATE_USER_MARKER, load_template

__all__ = [
    "ACTOR_FIELDS",
    "ANALYZER_FIELDS",
    "DEFAULT_GOODBYE_WORDS",
    "DIFFICULTY_PRESETS",
    "EMOTION_LEVELS",
    "EMOTION_MAX",
    "FAILURE_EMOTION",
    "FAIL_LEVEL",
    "FALLBACK_USER_REPLY",
    "LANGUAGES",
    "LANGUAGE_CHOICES",
    "MAX_PARSED_ABS_DELTA",
    "RESERVE_LEVELS",
    "SUCCESS_EMOTION",
    "TEMPLATE_USER_MARKER",
    "TERMINATION_REASONS",
    "THINK_CLOSE",
    "THINK_OPEN",
    "ActorResult",
    "AnalyzerResult",
    "DialogueState",
    "RetryDecision",
    "SimulatorSettings",
    "ThinkSplit",
    "TurnRecord",
    "add_policy_reply",
    "add_user_message",
    "apply_analysis",
    "apply_delta",
    "contains_goodbye",
    "decide_retry",
    "emotion_level",
    "goodbye_word",
    "load_template",
    "new_dialogue",
    "parse_actor",
    "parse_analyzer",
    "render_actor_prompt",
    "render_analyzer_prompt",
    "render_policy_messages",
    "resolve_language",
    "reward",
    "settings_from_config",
    "split_think",
    "termination_reason",
    "visible_reply",
]
