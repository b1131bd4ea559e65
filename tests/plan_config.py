"""A tiny config for the planner / multi-host tests (the fields rlver_jax.plan reads)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.policy = ml_collections.ConfigDict(dict(preset="tiny", param_dtype="float32",
                                              dtype="float32", remat="none"))
    c.simulator = ml_collections.ConfigDict(dict(preset="tiny", dtype="float32"))
    c.critic = ml_collections.ConfigDict(dict(enabled=False))
    c.mesh = ml_collections.ConfigDict(dict(shape=(2, 2, 2), rules="fsdp_tensor"))
    c.rollout = ml_collections.ConfigDict(dict(batch_dialogues=8, max_dialogue_tokens=64,
                                               max_turn_tokens=16))
    c.rl = ml_collections.ConfigDict(dict(micro_batch_size=0, kl_loss_coef=0.0))
    return c
