"""The components of a run, built from one config: what train, evaluate and plan share.

`build(config)` returns every training component at once (`Components`); the smaller
builders below it are what a command that needs only some of them calls:

  build_layout      mesh + logical-axis rules (training and sampling layouts)
  build_tokenizer   the chat tokenizer of `config.tokenizer`
  build_policy      the policy (an HF directory or a preset with random weights)
  build_critic      the critic (PPO): an HF directory or the policy's backbone + value head
  build_reference   the frozen reference parameters when a KL term is on
  simulator_settings / build_user   the simulated user (`rule` judge or an LLM simulator)
  rollout_settings / update_settings / build_updaters
  build_checkpointer

Models are built under the mesh and the training rules (flax shards at creation); the
simulator, which only samples, directly in the sampling layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from rlver_jax import sharding as sharding_lib
from rlver_jax.config_checks import ConfigError, agg_constant, validate_config
from rlver_jax.config_files import simulator_overrides
from rlver_jax.env import simulator as sim
from rlver_jax.env.profiles import load_profiles, profiles_path
from rlver_jax.env.rollout import DialogueRollout, RolloutSettings
from rlver_jax.env.users import LLMUser, RuleUser, SimulatorSampling
from rlver_jax.model_source import ModelSourceError, resolve_model_dir
from rlver_jax.models import (Qwen2, Qwen2Config, compute_dtype_copy, create_model,
                              critic_from_policy, get_preset, load_hf, load_hf_critic)
from rlver_jax.models.config import ATTENTION_IMPLEMENTATIONS
from rlver_jax.models.hf_io import stored_dtype
from rlver_jax.rl.advantages import CRITIC_ALGORITHMS
from rlver_jax.rl.update import TrainState, UpdateSettings, Updater, make_optimizer
from rlver_jax.sampling import Sampler
from rlver_jax.tokenizer import load_chat_tokenizer

@dataclasses.dataclass(frozen=True)
class Layout:
    """The device mesh and the two logical-axis rule tables: `rules` lays out what is
    trained, `sampling_rules` what only samples (the simulator, the policy's sampling view)."""

    mesh: jax.sharding.Mesh
    rules: Any
    sampling_rules: Any


@dataclasses.dataclass
class BuiltModel:
    """A model with its config and `export_dtype`, the dtype its weights came in (an HF
    directory's, or the preset's), which `export` writes by default."""

    config: Qwen2Config
    model: Any
    export_dtype: str


@dataclasses.dataclass
class Components:
    """Everything a training run holds, built by `build`."""

    config: ml_collections.ConfigDict
    layout: Layout
    tokenizer: Any
    profiles: list
    policy: BuiltModel
    critic: BuiltModel | None
    reference_params: Any
    sim_settings: sim.SimulatorSettings
    user: Any
    rollout_settings: RolloutSettings
    policy_sampler: Sampler
    rollout: DialogueRollout
    policy_updater: Updater
    policy_state: TrainState
    critic_updater: Updater | None
    critic_state: TrainState | None


def build_layout(c: ml_collections.ConfigDict, devices=None) -> Layout:
    return Layout(mesh=sharding_lib.make_mesh(tuple(c.mesh.shape), devices),
                  rules=sharding_lib.get_rules(c.mesh.rules),
                  sampling_rules=sharding_lib.get_rules(c.mesh.sampling_rules))


def build_tokenizer(c: ml_collections.ConfigDict):
    return load_chat_tokenizer(c.tokenizer)


def resolve_profiles(spec: str):
    """A shipped set name or a jsonl path -> profiles."""
    try:
        return load_profiles(profiles_path(spec))
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e


def model_dir(c: ml_collections.ConfigDict, key: str) -> str:
    """The local directory of config `key` (section.hf_dir): a hub id is resolved
    through the Hugging Face cache."""
    section, field = key.split(".")
    try:
        return resolve_model_dir(c[section][field], what=f"config.{key}")
    except ModelSourceError as e:
        raise ConfigError(str(e)) from e


def attention(section, name: str) -> str:
    """The section's attention implementation (models/attention.py), checked."""
    value = section.get("attention", "auto")
    if value not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(f"config.{name}.attention={value!r}: expected one of "
                          f"{ATTENTION_IMPLEMENTATIONS}")
    return value


def param_dtype(section) -> str:
    """A section's storage dtype: `param_dtype` where the section has one (trained models),
    else its compute dtype (models that are never trained)."""
    return section.get("param_dtype") or section.dtype


def model_config(section, tokenizer, name: str) -> Qwen2Config:
    """The model config of a preset section (`policy`, `simulator`), fitted to the tokenizer."""
    cfg = get_preset(section.preset)
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"config.{name}.preset={section.preset!r} has a vocabulary of "
                          f"{cfg.vocab_size}, smaller than the tokenizer's {tokenizer.vocab_size}")
    return cfg.replace(param_dtype=param_dtype(section), dtype=section.dtype,
                       remat=section.get("remat", "none"),
                       attention=attention(section, name),
                       eos_token_id=tokenizer.im_end_id, bos_token_id=None)


def build_policy(c: ml_collections.ConfigDict, tokenizer, layout: Layout) -> BuiltModel:
    """The policy: float32 masters (`param_dtype`), computing in `dtype`. Call under the
    mesh and the training rules."""
    if c.policy.hf_dir:
        path = model_dir(c, "policy.hf_dir")
        config, model = load_hf(path, c.policy.dtype, layout.mesh, layout.rules,
                                param_dtype=param_dtype(c.policy), remat=c.policy.remat,
                                attention=attention(c.policy, "policy"))
        return BuiltModel(config, model, stored_dtype(path))
    config = model_config(c.policy, tokenizer, "policy")
    model = create_model(config, c.seed, mesh=layout.mesh, rules=layout.rules)
    return BuiltModel(config, model, get_preset(c.policy.preset).param_dtype)


def build_critic(c: ml_collections.ConfigDict, policy: BuiltModel, layout: Layout
                 ) -> BuiltModel:
    """The critic of PPO: an HF directory, or the policy's backbone with a value head."""
    if c.critic.hf_dir:
        path = model_dir(c, "critic.hf_dir")
        config, model = load_hf_critic(path, c.critic.dtype, layout.mesh, layout.rules,
                                       param_dtype=param_dtype(c.critic), remat=c.policy.remat,
                                       attention=attention(c.critic, "critic"))
        return BuiltModel(config, model, stored_dtype(path))
    config = policy.config.replace(dtype=c.critic.dtype, param_dtype=param_dtype(c.critic))
    return BuiltModel(config, critic_from_policy(policy.model, config), policy.export_dtype)


def kl_on(c: ml_collections.ConfigDict) -> bool:
    return bool(c.rl.kl_loss_coef or c.rl.kl_reward_coef)


def build_reference(c: ml_collections.ConfigDict, policy: BuiltModel, layout: Layout):
    """The reference parameters (an `nnx.State`) when a KL term is on, else None. Never
    trained: held in the policy's compute dtype."""
    if not kl_on(c):
        return None
    if c.reference.hf_dir:
        _, ref = load_hf(model_dir(c, "reference.hf_dir"), c.policy.dtype, layout.mesh,
                         layout.rules)
        return nnx.state(ref, nnx.Param)
    params = nnx.state(compute_dtype_copy(policy.model), nnx.Param)
    if policy.config.param_dtype == policy.config.dtype:
        # The copy aliases the masters, whose buffers the update step donates.
        params = jax.tree.map(jnp.copy, params)
    return params


def simulator_settings(c: ml_collections.ConfigDict, difficulty: str | None = None,
                       **extra) -> sim.SimulatorSettings:
    try:
        overrides = simulator_overrides(c.simulator.overrides)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    try:
        return sim.settings_from_config({"preset": difficulty or c.simulator.difficulty,
                                         **overrides, **extra})
    except ValueError as e:
        raise ConfigError(f"config.simulator: {e}") from e


def simulator_sampling(c: ml_collections.ConfigDict) -> SimulatorSampling:
    s = c.simulator
    return SimulatorSampling(temperature=s.temperature, top_p=s.top_p,
                             max_analyzer_tokens=s.max_analyzer_tokens,
                             max_actor_tokens=s.max_actor_tokens,
                             max_prompt_tokens=s.max_prompt_tokens,
                             reuse_cache=s.reuse_cache)


def build_user(c: ml_collections.ConfigDict, tokenizer, layout: Layout,
               settings: sim.SimulatorSettings):
    """The simulated user: the TOY rule judge, or an LLM simulator (its own tokenizer when
    `simulator.tokenizer` is set, else the policy's). Call under the mesh."""
    if c.simulator.kind == "rule":
        return RuleUser(settings)
    sim_tok = load_chat_tokenizer(c.simulator.tokenizer) if c.simulator.tokenizer else tokenizer
    # The simulator only samples: it is built directly in the sampling layout.
    if c.simulator.hf_dir:
        _, model = load_hf(model_dir(c, "simulator.hf_dir"), c.simulator.dtype, layout.mesh,
                           layout.sampling_rules,
                           attention=attention(c.simulator, "simulator"))
    else:
        model = create_model(model_config(c.simulator, sim_tok, "simulator"), c.seed + 1,
                             mesh=layout.mesh, rules=layout.sampling_rules)
    return LLMUser(settings, model, sim_tok, Sampler(model, mesh=layout.mesh),
                   simulator_sampling(c))


def with_settings(user, settings: sim.SimulatorSettings):
    """The same simulated user (same model and sampler) under other settings."""
    if isinstance(user, RuleUser):
        return RuleUser(settings)
    return LLMUser(settings, user.model, user.tokenizer, user.sampler, user.sampling)


def rollout_settings(c: ml_collections.ConfigDict) -> RolloutSettings:
    r = c.rollout
    return RolloutSettings(
        think=r.think, group_size=r.group_size, max_turn_tokens=r.max_turn_tokens,
        max_dialogue_tokens=r.max_dialogue_tokens, temperature=r.temperature,
        top_p=r.top_p, top_k=r.top_k, unclosed_think=r.unclosed_think,
        truncated_turn=r.get("truncated_turn", "pass"))


def update_settings(c: ml_collections.ConfigDict) -> UpdateSettings:
    rl = c.rl
    return UpdateSettings(
        clip_low=rl.clip_low, clip_high=rl.clip_high,
        dual_clip=rl.dual_clip or None, value_clip=rl.value_clip or None,
        entropy_coef=rl.entropy_coef, kl_loss_coef=rl.kl_loss_coef,
        kl_loss_kind=rl.kl_loss_kind, agg_mode=rl.agg_mode,
        constant_normaliser=agg_constant(c),
        micro_batch_size=rl.micro_batch_size, logprob_chunk=rl.logprob_chunk,
        temperature=c.rollout.temperature or 1.0)


def build_updaters(c: ml_collections.ConfigDict, policy: BuiltModel,
                   critic: BuiltModel | None, layout: Layout):
    """(policy_updater, policy_state, critic_updater, critic_state); the critic's are None
    without a critic. The learning-rate schedules span every update of the run."""
    rl = c.rl
    total = c.total_steps * rl.epochs * rl.mini_batches
    settings = update_settings(c)

    def one(model, lr, warmup, kind):
        tx = make_optimizer(lr, total, warmup, rl.max_grad_norm, rl.weight_decay)
        updater = Updater(model, tx, settings, kind=kind)
        return updater, updater.init_state(model, layout.mesh, layout.rules)

    policy_updater, policy_state = one(policy.model, rl.actor_lr, rl.actor_warmup_ratio,
                                       "policy")
    critic_updater = critic_state = None
    if critic is not None:
        critic_updater, critic_state = one(critic.model, rl.critic_lr, rl.critic_warmup_ratio,
                                           "critic")
    return policy_updater, policy_state, critic_updater, critic_state


def build_checkpointer(c: ml_collections.ConfigDict, workdir: str):
    from rlver_jax import storage
    from rlver_jax.checkpoint import Checkpointer
    return Checkpointer(storage.join(workdir, "checkpoints"), save_every=c.checkpoint.every,
                        keep=c.checkpoint.keep, async_save=c.checkpoint.async_save)


def build(c: ml_collections.ConfigDict, devices=None) -> Components:
    """Every component of a training run (validates the config first)."""
    validate_config(c)
    layout = build_layout(c, devices)
    tokenizer = build_tokenizer(c)
    profiles = resolve_profiles(c.data.train_profiles)
    settings = simulator_settings(c)
    with jax.set_mesh(layout.mesh), sharding_lib.logical_rules(layout.rules):
        policy = build_policy(c, tokenizer, layout)
        critic = (build_critic(c, policy, layout) if c.rl.algorithm in CRITIC_ALGORITHMS
                  else None)
        reference = build_reference(c, policy, layout)
        user = build_user(c, tokenizer, layout, settings)
    updaters = build_updaters(c, policy, critic, layout)
    r_settings = rollout_settings(c)
    sampler = Sampler(policy.model, mesh=layout.mesh)
    return Components(
        config=c, layout=layout, tokenizer=tokenizer, profiles=profiles, policy=policy,
        critic=critic, reference_params=reference, sim_settings=settings, user=user,
        rollout_settings=r_settings, policy_sampler=sampler,
        rollout=DialogueRollout(tokenizer, user, settings, r_settings, sampler),
        policy_updater=updaters[0], policy_state=updaters[1], critic_updater=updaters[2],
        critic_state=updaters[3])


def sampling_view(policy_updater: Updater, state: TrainState, layout: Layout) -> Qwen2:
    """The current policy as sampling reads it: in the compute dtype (a bf16 copy of
    float32 masters halves what decoding reads) and in the sampling layout (a
    device-to-device reshard when the two layouts differ on this mesh). With masters
    already in the compute dtype and one layout, the training arrays themselves."""
    view = compute_dtype_copy(policy_updater.model(state))
    if layout.sampling_rules == layout.rules or layout.mesh.size == 1:
        return view
    return sharding_lib.sampling_model(view, layout.mesh, layout.sampling_rules)
