"""Jitted, batched sampling with a KV cache."""

from rlver_jax.sampling.sampler import (SampleOutput, Sampler, SamplerState, generate,
                                        next_power_of_two)
from rlver_jax.sampling.token_sampling import filter_logits

__all__ = ["SampleOutput", "Sampler", "SamplerState", "filter_logits", "generate",
           "next_power_of_two"]
