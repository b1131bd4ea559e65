"""Like tiny.py, but the simulated user is a tiny random LLM running in process (analyzer
and actor calls through the sampler). Random weights: it shows the machinery, not learning;
most simulator outputs fail to parse and fall back (counted in rollout/* metrics)."""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.total_steps = 4
    c.simulator.kind = "llm"
    c.simulator.preset = "tiny"
    c.simulator.max_analyzer_tokens = 24
    c.simulator.max_actor_tokens = 16
    # Above the longest prompt of a 4-turn dialogue (the analyzer's: up to 1,280 tokens of the
    # bundled vocabulary at the first turn, 1,420 at the last; test_configs checks it): at
    # 1,024 every analyzer prompt was cut in the middle, its newest 512 tokens prefilled anew
    # every call, so the run measured the truncation fallback rather than the kept cache.
    c.simulator.max_prompt_tokens = 2048
    c.rollout.batch_dialogues = 4
    c.rollout.group_size = 2
    c.rollout.max_turn_tokens = 12
    return c
