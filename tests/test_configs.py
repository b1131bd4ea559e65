"""The config files: RLVER defaults, the ablation grid, validation errors."""

import dataclasses
import itertools

import numpy as np
import pytest

from configs import base, rlver, tiny, tiny_llm
from rlver_jax.env.simulator import SimulatorSettings
from rlver_jax.models import PRESETS
from rlver_jax.build import simulator_settings
from rlver_jax.config_checks import ConfigError, validate_config


def test_base_has_the_reference_hyper_parameters():
    c = base.get_config()
    assert (c.rl.algorithm, c.rl.actor_lr, c.rl.critic_lr) == ("ppo", 1e-6, 5e-6)
    assert (c.rl.actor_warmup_ratio, c.rl.critic_warmup_ratio) == (0.02, 0.05)
    assert (c.rl.clip_low, c.rl.clip_high, c.rl.value_clip, c.rl.entropy_coef) == (
        0.2, 0.2, 0.5, 0.001)
    assert (c.rl.gamma, c.rl.lam, c.rl.kl_loss_coef, c.rl.kl_reward_coef) == (1.0, 1.0, 0, 0)
    assert (c.rl.epochs, c.rl.mini_batches, c.rl.max_grad_norm) == (1, 1, 1.0)
    assert c.rollout.batch_dialogues == 32 and c.rollout.temperature == 1.0
    assert c.policy.preset == "qwen2.5-7b" and c.rollout.think
    validate_config(c)


@pytest.mark.parametrize("algo,think,difficulty,policy", itertools.product(
    rlver.ALGOS, rlver.THINK, rlver.DIFFICULTIES, rlver.POLICIES))
def test_every_grid_cell_builds_and_validates(algo, think, difficulty, policy):
    c = rlver.get_config(f"{algo},{think},{difficulty},{policy}")
    validate_config(c)
    assert c.rl.algorithm == algo and c.rollout.think == (think == "think")
    assert c.policy.preset in PRESETS and c.simulator.preset in PRESETS
    assert c.rollout.group_size == (4 if algo == "grpo" else 1)
    settings = simulator_settings(c)
    expected_start = {"sage": 40, "hard": 30, "strict": 30}[difficulty]
    assert settings.start_emotion == expected_start


def test_grid_rejects_a_bad_argument_and_names_it():
    with pytest.raises(ValueError, match="DIFFICULTY='medium'"):
        rlver.get_config("ppo,think,medium,qwen2.5-7b")
    with pytest.raises(ValueError, match="ALGO,THINK,DIFFICULTY,POLICY"):
        rlver.get_config("ppo,think")
    assert rlver.get_config("grpo,nothink,sage,qwen2.5-0.5b,qwen2.5-72b").simulator.preset == (
        "qwen2.5-72b")


def test_simulator_overrides_and_optional_bounds():
    c = rlver.get_config("ppo,think,sage,qwen2.5-7b")
    c.simulator.overrides.start_emotion = 55
    c.simulator.overrides.delta_clamp = "off"
    s = simulator_settings(c)
    assert s.start_emotion == 55 and s.delta_clamp is None and s.max_turns == 10
    c.simulator.overrides.delta_clamp = 7
    assert simulator_settings(c).delta_clamp == 7


def test_simulator_knobs_are_the_settings_fields():
    knobs = base.get_config().simulator.overrides
    assert sorted(knobs) == sorted(f.name for f in dataclasses.fields(SimulatorSettings))
    assert all(v is None for v in knobs.values())


@pytest.mark.parametrize("knob,value,needle", [
    ("delta_clamp", -1, "delta_clamp=-1: write 'off'"),
    ("end_below", "low", "end_below='low': expected int or 'off'"),
    ("goodbye_word", 3, "goodbye_word=3: expected str or 'off'"),
])
def test_simulator_knob_errors_name_the_key(knob, value, needle):
    c = tiny.get_config()
    c.simulator.overrides[knob] = value
    with pytest.raises(ConfigError, match=f"config.simulator.overrides.{needle}"):
        simulator_settings(c)
    # A knob that cannot be off is typed: ml_collections refuses "off" when it is set.
    with pytest.raises(TypeError, match="max_turns"):
        c.simulator.overrides.max_turns = "off"


@pytest.mark.parametrize("key,value,needle", [
    ("rl.algorithm", "a2c", "config.rl.algorithm"),
    ("rollout.batch_dialogues", 30, "config.rollout.batch_dialogues"),
    ("simulator.kind", "api", "config.simulator.kind"),
    ("rl.dual_clip", 0.5, "config.rl.dual_clip"),
    ("mesh.rules", "zero", "config.mesh.rules"),
])
def test_validation_names_the_key(key, value, needle):
    c = rlver.get_config("grpo,think,hard,qwen2.5-7b")
    section, field = key.split(".")
    c[section][field] = value
    with pytest.raises(ConfigError, match=needle):
        validate_config(c)


def test_tiny_configs_validate():
    for module in (tiny, tiny_llm):
        validate_config(module.get_config())


def test_tiny_llm_prompts_fit_the_simulator_cap():
    """The tiny_llm simulator's analyzer and actor prompts, at the last turn of a dialogue
    whose every message is as long as generation allows, stay under its prompt cap for
    every training profile: nothing is truncated, so its reuse benchmark measures the
    continued cache, not the truncation fallback."""
    from rlver_jax import build
    from rlver_jax.env import simulator as sim

    c = tiny_llm.get_config()
    tok = build.build_tokenizer(c)
    settings = simulator_settings(c)
    rng = np.random.default_rng(0)
    text = lambda n: tok.decode(rng.integers(3, 2000, size=n).tolist(),
                                skip_special_tokens=True)
    turns = settings.max_turns
    longest = {"analyzer": 0, "actor": 0}
    for profile in build.resolve_profiles(c.data.train_profiles):
        history = []
        for _ in range(turns):
            history += [("user", text(c.simulator.max_actor_tokens)),
                        ("assistant", text(c.rollout.max_turn_tokens))]
        analysis = text(c.simulator.max_analyzer_tokens)
        prompts = {
            "analyzer": sim.render_analyzer_prompt(profile, history[:-1], history[-1][1], 0,
                                                   settings, think=False),
            "actor": sim.render_actor_prompt(profile, history, analysis, "F", settings,
                                             think=False)}
        for name, messages in prompts.items():
            ids = tok.apply_chat_template(messages, add_generation_prompt=True)
            longest[name] = max(longest[name], len(ids))
    assert max(longest.values()) <= c.simulator.max_prompt_tokens, longest
