"""Reinforcement-learning math for RLVER: pure, jit-able JAX functions.

- `rlver_jax.rl.batching`: samples -> the train batch (collate, bucket, pad).
- `rlver_jax.rl.advantages`: GAE (with multi-turn gaps), GRPO / Dr.GRPO, RLOO, whitening;
  `compute` picks one by `rl.algorithm`.
- `rlver_jax.rl.losses`: PPO policy and value losses, truncated importance weights, KL
  estimators, and `(sum, count)` aggregation that stays exact under gradient accumulation.
- `rlver_jax.rl.logprobs`: entropy of logits and the chunked LM-head log-prob / entropy.
- `rlver_jax.rl.update`: the jitted policy / critic update steps.
"""
