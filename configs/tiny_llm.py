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
    c.simulator.max_prompt_tokens = 1024
    c.rollout.batch_dialogues = 4
    c.rollout.group_size = 2
    c.rollout.max_turn_tokens = 12
    return c
