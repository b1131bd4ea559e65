"""The embedded default (`python -m rlver_jax.train` with no flags, `make train`).

A tiny random policy on CPU learns against the TOY `rule` judge (lexicon scoring, template
user replies) with the bundled sentencepiece vocabulary and the shipped English profiles.
It finishes in a few minutes on two cores and the mean reward rises: it demonstrates the
machinery, not empathy.
"""

from configs import base


def get_config():
    c = base.get_config()
    c.seed = 0
    c.total_steps = 40
    c.tokenizer = "tiny"
    c.policy.preset = "tiny"
    c.policy.dtype = "float32"
    c.policy.remat = "none"
    c.critic.dtype = "float32"
    c.simulator.kind = "rule"
    c.simulator.preset = "tiny"
    c.simulator.dtype = "float32"
    c.simulator.difficulty = "hard"
    # A higher start and fewer turns keep every dialogue alive to the end, so the final
    # emotion sums the judge's verdicts on all replies: a dense enough signal for a model
    # that starts from random weights.
    c.simulator.overrides.start_emotion = 60
    c.simulator.overrides.max_turns = 4
    c.data.train_profiles = "en_train"
    c.rollout.think = False
    c.rollout.batch_dialogues = 16
    c.rollout.group_size = 4
    c.rollout.max_turn_tokens = 8
    c.rollout.max_dialogue_tokens = 1024
    c.rl.algorithm = "grpo"
    c.rl.actor_lr = 1e-2
    c.rl.actor_warmup_ratio = 0.0
    c.rl.critic_lr = 3e-3
    c.rl.critic_warmup_ratio = 0.0
    c.rl.entropy_coef = 0.0
    # The demo's learning rate (1e-2) was tuned without weight decay.
    c.rl.weight_decay = 0.0
    c.rl.logprob_chunk = 256
    c.checkpoint.every = 10
    c.checkpoint.keep = 2
    c.log.dialogues_per_step = 2
    c.eval.profiles = "en_eval"
    c.eval.max_dialogues = 8
    return c
