"""Memory planner: per-device bytes of a training setup, before booking the hardware.

    python -m rlver_jax.plan [--config FILE[:ARG]] [--config.key=value ...] \\
        [--devices N] [--device_memory_gib G] [--max_prefill_tokens T] [--json]

It takes the training config, as `python -m rlver_jax.train` does (default: the embedded
tiny run), and plans what that training holds per device; e.g.

    python -m rlver_jax.plan --config configs/rlver.py \\
        --config.policy.preset=qwen2.5-7b --config.simulator.preset=qwen2.5-72b \\
        --config.mesh.shape='(1,8,4)' --devices 32 --device_memory_gib 95

The measurement is `rlver_jax.plan_memory` (programs compiled on abstract inputs); this
module reads the config and prints the table. `--devices N` plans for N devices; when this
machine has fewer, it plans on N fake CPU devices (XLA's host platform device count must
be set before JAX starts, so the module re-executes itself with the flag when JAX is
already loaded). Scratch sizes come from the compiler of the platform that compiles: CPU
numbers for a TPU / GPU plan are an estimate (same sharding and rematerialisation,
different fusion and layouts).

Config keys read (configs/base.py's): policy.preset / .dtype / .param_dtype / .remat /
.attention; simulator.kind / .preset / .dtype / .attention / .max_prompt_tokens /
.max_analyzer_tokens / .max_actor_tokens / .reuse_cache; critic.dtype / .param_dtype;
rl.algorithm (a critic for those in rl.advantages.CRITIC_ALGORITHMS: PPO),
rl.kl_loss_coef / .kl_reward_coef (a reference model when either is set), rl.mini_batches,
rl.micro_batch_size; mesh.shape / .rules / .sampling_rules; rollout.batch_dialogues
(dialogues sampled together), rollout.max_dialogue_tokens (sequence length),
rollout.max_turn_tokens.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping

_FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count"
_REEXEC_ENV = "RLVER_PLAN_REEXEC"


def _requested_devices(argv: list[str]) -> int | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return None


def _fake_device_env(n: int, env: Mapping[str, str]) -> dict[str, str]:
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith(_FAKE_DEVICES_FLAG))
    return {**env, "XLA_FLAGS": f"{flags} {_FAKE_DEVICES_FLAG}={n}".strip()}


def _ensure_host_devices(argv: list[str]) -> None:
    """Makes N host (CPU) devices available before JAX starts its CPU backend.

    Only the CPU platform is affected: a machine with N real accelerators still plans on
    those. When JAX is already imported (its flags are read once), re-execute.
    """
    n = _requested_devices(argv)
    if n is None or f"{_FAKE_DEVICES_FLAG}={n}" in os.environ.get("XLA_FLAGS", ""):
        return
    env = _fake_device_env(n, os.environ)
    if "jax" not in sys.modules:
        os.environ.update(env)
        return
    if os.environ.get(_REEXEC_ENV):
        return  # already re-executed once; plan with what there is
    env[_REEXEC_ENV] = "1"
    os.execve(sys.executable, [sys.executable, "-m", "rlver_jax.plan", *argv[1:]], env)


if __name__ == "__main__":
    _ensure_host_devices(sys.argv)

import jax  # noqa: E402

from rlver_jax import build  # noqa: E402
from rlver_jax import sharding as shd  # noqa: E402
from rlver_jax.models import get_preset  # noqa: E402
from rlver_jax.plan_memory import GiB, PlanSettings, plan  # noqa: E402
from rlver_jax.rl.advantages import CRITIC_ALGORITHMS  # noqa: E402

DEFAULT_PREFILL_TOKENS = PlanSettings.policy_prefill_tokens

def _read(cfg, dotted: str):
    """The value of a key that configs/base.py defines; a config without it is an error
    that names the key."""
    node = cfg
    for key in dotted.split("."):
        try:
            node = node[key]
        except (KeyError, TypeError):
            raise ValueError(f"config.{dotted}: missing (the planner reads a training "
                             "config built on configs/base.py)") from None
    return node


def settings_from_config(cfg, policy_prefill_tokens: int = DEFAULT_PREFILL_TOKENS
                         ) -> PlanSettings:
    """The planner's settings from a training config (configs/base.py's keys).

    As `rlver_jax.build` decides: a critic for PPO, a reference model when a KL term is on,
    the simulator model when `simulator.kind` is "llm"; one update step takes
    `rollout.batch_dialogues / rl.mini_batches` sequences. `policy_prefill_tokens` (the
    longest policy prefill) is the planner's own knob: no config key bounds it.
    """
    get = lambda key: _read(cfg, key)  # noqa: E731
    to_plain = lambda r: r if isinstance(r, str) else dict(r)  # noqa: E731
    dialogues = int(get("rollout.batch_dialogues"))
    turn = int(get("rollout.max_turn_tokens"))
    llm_user = get("simulator.kind") == "llm"
    return PlanSettings(
        policy_preset=str(get("policy.preset")),
        policy_dtype=str(get("policy.dtype")),
        policy_param_dtype=build.param_dtype(get("policy")),
        policy_remat=get("policy.remat") or None,
        simulator_preset=(get("simulator.preset") or None) if llm_user else None,
        simulator_dtype=str(get("simulator.dtype")),
        policy_attention=str(get("policy.attention")),
        simulator_attention=str(get("simulator.attention")),
        simulator_prompt_tokens=int(get("simulator.max_prompt_tokens")),
        simulator_new_tokens=max(int(get("simulator.max_analyzer_tokens")),
                                 int(get("simulator.max_actor_tokens"))) or turn,
        simulator_reuse_cache=bool(get("simulator.reuse_cache")),
        critic=get("rl.algorithm") in CRITIC_ALGORITHMS,
        critic_dtype=get("critic.dtype") or None,
        critic_param_dtype=build.param_dtype(get("critic")),
        reference=build.kl_on(cfg),
        mesh_shape=tuple(int(s) for s in get("mesh.shape")),
        rules=to_plain(get("mesh.rules")), sampling_rules=to_plain(get("mesh.sampling_rules")),
        batch=max(dialogues // max(int(get("rl.mini_batches")), 1), 1),
        seq_len=int(get("rollout.max_dialogue_tokens")),
        micro_batch=int(get("rl.micro_batch_size")),
        turn_tokens=turn,
        policy_prefill_tokens=int(policy_prefill_tokens),
        sampling_batch=dialogues)


def _gib(n: int) -> str:
    return f"{n / GiB:10.3f}{n:>16,d}"


def format_table(result: Mapping[str, Any]) -> str:
    """A human-readable table of `plan`'s result (GiB per device)."""
    lines = [f"mesh {result['mesh']} on {result['devices']} {result['platform']} devices; "
             f"rules: train={result['rules']} sampling={result['sampling_rules']}",
             f"{'component':<34}{'GiB/device':>10}{'bytes/device':>16}"]
    row = lambda name, n: lines.append(f"{name:<34}{_gib(n)}")
    p = result["policy"]
    row(f"policy params ({p.get('param_dtype', '?')} masters)", p["params"])
    row(f"policy Adam moments ({p.get('param_dtype', '?')})", p["opt_state"])
    row("policy update scratch (temp)", p["temp"])
    row("policy update batch", p["batch"])
    row(f"policy sampling copy ({p.get('dtype', '?')})", p["sampling_copy"])
    row("policy KV cache", p["sampler"]["kv_cache"])
    row("policy prefill scratch (temp)", p["sampler"]["prefill_temp"])
    row("policy decode scratch (temp)", p["sampler"]["decode_temp"])
    if p["sampler"].get("cpu_weight_upcast"):
        row("  of which CPU bf16->f32 weights", p["sampler"]["cpu_weight_upcast"])
    if "critic" in result:
        c = result["critic"]
        row("critic params", c["params"])
        row("critic optimizer state", c["opt_state"])
        row("critic update scratch (temp)", c["temp"])
    if "reference" in result:
        row("reference params", result["reference"]["params"])
    if "simulator" in result:
        sim = result["simulator"]
        row("simulator params (sampling)", sim["params"])
        streams = sim.get("kv_cache_streams", 1)
        row(f"simulator KV cache x{streams}" + (" (analyzer, actor)" if streams == 2 else ""),
            streams * sim["kv_cache"])
        row("simulator prefill scratch (temp)", sim["prefill_temp"])
        row("simulator decode scratch (temp)", sim["decode_temp"])
        if sim.get("cpu_weight_upcast"):
            row("  of which CPU bf16->f32 weights", sim["cpu_weight_upcast"])
    lines.append("-" * 60)
    row("resident (all phases)", result["resident_bytes_per_device"])
    row("peak during update", result["update_peak_bytes_per_device"])
    cpu_rollout = result.get("cpu_compiler_rollout_peak_bytes_per_device",
                             result["rollout_peak_bytes_per_device"])
    if cpu_rollout != result["rollout_peak_bytes_per_device"]:
        row("peak during rollout (CPU compiler)", cpu_rollout)
        row("peak during rollout (target)", result["rollout_peak_bytes_per_device"])
    else:
        row("peak during rollout", result["rollout_peak_bytes_per_device"])
    row("PEAK", result["peak_bytes_per_device"])
    if "fits" in result:
        verdict = "fits" if result["fits"] else "DOES NOT FIT"
        headroom = 1 - result["peak_bytes_per_device"] / result["device_memory_bytes"]
        lines.append(f"device memory {result['device_memory_bytes'] / GiB:.1f} GiB: {verdict} "
                     f"(headroom {100 * headroom:.0f}%)")
    if result["platform"] == "cpu":
        lines.append("scratch (temp) compiled for CPU: an estimate for TPU/GPU")
        if cpu_rollout != result["rollout_peak_bytes_per_device"]:
            lines.append("target peak = CPU peak minus the CPU compiler's bf16->f32 weight "
                         "copy (measured by a matmul-only probe; TPU/GPU multiply bf16)")
    return "\n".join(lines)


def _plan_devices(n: int | None):
    """N devices: the default backend's when it has enough, else host (CPU) devices."""
    if n is None:
        return jax.devices()
    for devices in (jax.devices(), jax.devices("cpu")):
        if len(devices) >= n:
            return devices[:n]
    raise SystemExit(f"--devices {n}: only {len(jax.devices('cpu'))} host devices; set "
                     f"XLA_FLAGS={_FAKE_DEVICES_FLAG}={n} before JAX starts")


def main(argv):
    from absl import flags
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    from rlver_jax.cli_errors import exit_with, one_line
    try:
        settings = settings_from_config(flags.FLAGS.config, flags.FLAGS.max_prefill_tokens)
        # Presets and rule tables are looked up deep inside `plan`: check them here, where
        # a bad value is a config error and not a failure of the planner.
        for key, preset in (("policy.preset", settings.policy_preset),
                            ("simulator.preset", settings.simulator_preset)):
            if preset is not None:
                try:
                    get_preset(preset)
                except KeyError as e:
                    raise ValueError(f"config.{key}: {one_line(e)}") from e
        for key, rules in (("mesh.rules", settings.rules),
                           ("mesh.sampling_rules", settings.sampling_rules)):
            try:
                shd.get_rules(rules)
            except (KeyError, ValueError) as e:
                raise ValueError(f"config.{key}: {one_line(e)}") from e
    except (KeyError, ValueError, TypeError) as e:
        exit_with(one_line(e))
    memory = flags.FLAGS.device_memory_gib
    layout = build.build_layout(flags.FLAGS.config, _plan_devices(flags.FLAGS.devices))
    result = plan(settings, layout, device_memory_bytes=int(memory * GiB) if memory else None)
    print(json.dumps(result, sort_keys=True, default=str) if flags.FLAGS.json
          else format_table(result))


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from rlver_jax import config_files
    from rlver_jax.cli_errors import config_error, parse_flags_or_exit

    config_files.prepare_config_argv()
    try:
        # config_flags reads the overrides in sys.argv while the flag is defined.
        config_flags.DEFINE_config_file("config", config_files.DEFAULT_CONFIG,
                                        "ml-collections training config (configs/*.py[:ARG]).",
                                        lock_config=True)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        print(config_error(e, sys.argv), file=sys.stderr)
        sys.exit(2)
    flags.DEFINE_integer("devices", None, "Plan for this many devices (fake CPU devices "
                         "when fewer exist).")
    flags.DEFINE_float("device_memory_gib", None, "Memory per device, for a fits / does "
                       "not fit verdict (e.g. 95 for TPU v5p, 80 for H100).")
    flags.DEFINE_integer("max_prefill_tokens", DEFAULT_PREFILL_TOKENS, "Longest policy "
                         "prefill: the opening prompt, or a user turn appended to the cached "
                         "dialogue.")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
    app.run(main, flags_parser=parse_flags_or_exit)
