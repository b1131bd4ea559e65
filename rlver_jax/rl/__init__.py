"""Reinforcement-learning math for RLVER: pure, jit-able JAX functions.

- `rlver_jax.rl.advantages`: GAE (with multi-turn gaps), GRPO / Dr.GRPO, RLOO, whitening.
- `rlver_jax.rl.losses`: PPO policy and value losses, truncated importance weights, KL
  estimators, and `(sum, count)` aggregation that stays exact under gradient accumulation.
- `rlver_jax.rl.logprobs`: entropy of logits and the chunked LM-head log-prob / entropy.
"""
