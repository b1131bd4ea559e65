"""Reinforcement-learning math for RLVER: pure, jit-able JAX functions.

- `rlver_jax.rl.advantages`: GAE (with multi-turn gaps), GRPO / Dr.GRPO, RLOO, whitening.
- `rlver_jax.rl.losses`: PPO policy and value losses, KL estimators, entropy, the chunked
  LM-head log-prob / entropy, and `(sum, count)` aggregation that stays exact under
  gradient accumulation.
"""
