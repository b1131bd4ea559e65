"""A tiny training config for the planner tests: the embedded default with a tiny LLM user,
a 2 x 2 x 2 mesh and short sequences."""

from configs import tiny


def get_config():
    c = tiny.get_config()
    c.policy.param_dtype = c.policy.dtype = "float32"
    c.simulator.kind = "llm"
    c.simulator.max_prompt_tokens = 48
    c.simulator.max_analyzer_tokens = c.simulator.max_actor_tokens = 16
    c.mesh.shape = (2, 2, 2)
    c.rollout.batch_dialogues = 8
    c.rollout.max_dialogue_tokens = 64
    c.rollout.max_turn_tokens = 16
    return c
