"""Qwen2 / Qwen2.5 in Flax NNX, its critic, presets and Hugging Face interop."""

from rlver_jax.models.config import PRESETS, Qwen2Config, get_preset
from rlver_jax.models.hf_io import CheckpointFormatError, load_hf, load_hf_critic, save_hf
from rlver_jax.models.qwen2 import (KVCache, Qwen2, Qwen2Critic, compute_dtype_copy,
                                    count_params, create_model, critic_from_policy, init_cache)

__all__ = [
    "PRESETS", "Qwen2Config", "get_preset", "CheckpointFormatError", "load_hf",
    "load_hf_critic", "save_hf", "KVCache", "Qwen2", "Qwen2Critic", "compute_dtype_copy",
    "count_params",
    "create_model", "critic_from_policy", "init_cache",
]
