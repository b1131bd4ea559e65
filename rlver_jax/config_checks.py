"""Checks of a training config's values that ml_collections' type checks do not cover.

`validate_config` runs before anything is built; `validate_process_layout` once the
process count and the mesh are known. Each failure raises `ConfigError` with a message
that starts with the offending key (`config.rl.algorithm: ...`).
"""

from __future__ import annotations

import os

import ml_collections

from rlver_jax import sharding as sharding_lib
from rlver_jax.env import simulator as sim
from rlver_jax.env.rollout import TRUNCATED_TURN_MODES
from rlver_jax.model_source import looks_like_hub_id
from rlver_jax.models.config import DTYPES
from rlver_jax.rl import losses
from rlver_jax.rl.advantages import ALGORITHMS, CRITIC_ALGORITHMS


class ConfigError(ValueError):
    """A config value is invalid; the message names the key."""


def agg_constant(c: ml_collections.ConfigDict) -> float:
    """C of the `*-norm` aggregation modes: `rl.agg_constant`, or when it is 0 the maximum
    response length (rollout.max_turn_tokens in think mode, rollout.max_dialogue_tokens
    without it: there one sample is the whole dialogue)."""
    value = c.rl.get("agg_constant", 0)
    if value:
        return float(value)
    return float(c.rollout.max_turn_tokens if c.rollout.think else c.rollout.max_dialogue_tokens)


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Value checks that ml_collections' type checks do not cover."""
    _check(c.rl.algorithm in ALGORITHMS, "rl.algorithm",
           f"{c.rl.algorithm!r} is not one of {ALGORITHMS}")
    _check(c.simulator.kind in ("llm", "rule"), "simulator.kind",
           f"{c.simulator.kind!r} is not one of ('llm', 'rule')")
    _check(c.simulator.difficulty in sim.DIFFICULTY_PRESETS, "simulator.difficulty",
           f"{c.simulator.difficulty!r} is not one of {tuple(sorted(sim.DIFFICULTY_PRESETS))}")
    _check(c.rollout.batch_dialogues % c.rollout.group_size == 0, "rollout.batch_dialogues",
           f"{c.rollout.batch_dialogues} is not a multiple of rollout.group_size "
           f"{c.rollout.group_size}")
    _check(c.rl.algorithm in CRITIC_ALGORITHMS or c.rollout.group_size >= 2,
           "rollout.group_size",
           f"{c.rl.algorithm.upper()} needs at least 2 dialogues per profile (a group baseline)")
    _check(c.total_steps >= 1, "total_steps", "must be >= 1")
    _check(c.rl.mini_batches >= 1 and c.rl.epochs >= 1, "rl.mini_batches",
           "mini_batches and epochs must be >= 1")
    _check(c.rl.agg_mode in losses.AGG_MODES, "rl.agg_mode",
           f"{c.rl.agg_mode!r} is not one of {losses.AGG_MODES}")
    _check(c.rl.dual_clip == 0 or c.rl.dual_clip > 1, "rl.dual_clip", "must be 0 (off) or > 1")
    _check(c.rl.tis_cap >= 0, "rl.tis_cap", "must be 0 (off) or > 0")
    for section in ("policy", "critic", "simulator"):
        for field in ("dtype", "param_dtype"):
            value = c[section].get(field)
            _check(value is None or value in DTYPES, f"{section}.{field}",
                   f"{value!r} is not one of {DTYPES}")
    _check(c.rl.get("agg_constant", 0) >= 0, "rl.agg_constant",
           "must be > 0, or 0 for the maximum response length")
    _check(c.rollout.unclosed_think in ("pass", "zero_reward"), "rollout.unclosed_think",
           f"{c.rollout.unclosed_think!r} is not one of ('pass', 'zero_reward')")
    _check(c.rollout.get("truncated_turn", "pass") in TRUNCATED_TURN_MODES,
           "rollout.truncated_turn",
           f"{c.rollout.get('truncated_turn')!r} is not one of {TRUNCATED_TURN_MODES}")
    for key in ("rules", "sampling_rules"):
        _check(c.mesh[key] in sharding_lib.RULE_PRESETS, f"mesh.{key}",
               f"{c.mesh[key]!r} is not one of {sorted(sharding_lib.RULE_PRESETS)}")
    for key in ("policy.hf_dir", "critic.hf_dir", "reference.hf_dir", "simulator.hf_dir"):
        section, field = key.split(".")
        path = c[section][field]
        if path and not os.path.isdir(os.path.expanduser(path)) and not looks_like_hub_id(path):
            raise ConfigError(f"config.{key}: model directory not found: {path} (pass a local "
                              "HF directory or a hub id such as Qwen/Qwen2.5-7B-Instruct)")
    _check(c.log.get("wandb_mode", "online") in ("online", "offline"), "log.wandb_mode",
           f"{c.log.get('wandb_mode')!r} is not one of ('online', 'offline')")


def validate_process_layout(c: ml_collections.ConfigDict, processes: int,
                            mesh_spans_processes: bool) -> None:
    """Multi-host checks: the step's profiles split evenly over the processes, and the
    mesh holds every process's devices (a process outside it would have nothing to do)."""
    profiles_per_step = c.rollout.batch_dialogues // c.rollout.group_size
    _check(profiles_per_step % processes == 0, "rollout.batch_dialogues",
           f"{c.rollout.batch_dialogues} dialogues in groups of {c.rollout.group_size} are "
           f"{profiles_per_step} profiles per step, which {processes} processes cannot "
           "share equally")
    _check(processes == 1 or mesh_spans_processes, "mesh.shape",
           f"{tuple(c.mesh.shape)} uses the devices of one process only, but this job has "
           f"{processes} processes: the mesh must span them all (e.g. -1 for the data axis)")
