"""Memory planner: per-device bytes of a training setup, before booking the hardware.

What is resident, as the trainer holds it: the trained models' master weights in
`param_dtype` (float32) with two Adam moments of the same dtype, the policy's sampling
copy in its compute dtype (`dtype`; none when the masters already are in that dtype and
layout), and the never-trained simulator / reference in their compute dtype.

For a config (model presets, mesh, batch shape) it compiles the real programs ahead of
time on abstract inputs: `jax.jit(...).lower(ShapeDtypeStruct with shardings).compile()`
allocates nothing, and `memory_analysis()` of the compiled SPMD program gives the
per-device scratch ("temp") bytes. Parameter, optimiser-state and KV-cache bytes come from
the shardings themselves (shard shape x item size, the largest device).

    python -m rlver_jax.plan --config configs/base.py \\
        --config.policy.preset=qwen2.5-7b --config.simulator.preset=qwen2.5-72b \\
        --config.mesh.shape='(1,8,4)' --devices 32 --device_memory_gib 95

`--devices N` plans for N devices; when this machine has fewer, it plans on N fake CPU
devices (XLA's host platform device count must be set before JAX starts, so the module
re-executes itself with the flag when JAX is already loaded). Scratch sizes come from the
compiler of the platform that compiles: CPU numbers for a TPU / GPU plan are an estimate
(same sharding and rematerialisation, different fusion and layouts).

Config fields read (all others are ignored): policy.preset, policy.dtype,
policy.param_dtype (default: policy.dtype), policy.remat, policy.attention,
simulator.attention, simulator.kind / .preset / .dtype / .max_prompt_tokens /
.max_analyzer_tokens / .max_actor_tokens, critic.enabled (default: rl.algorithm ==
"ppo"), critic.dtype / .param_dtype (default: the policy's), reference.enabled or a KL
coefficient > 0, mesh.shape, mesh.rules, mesh.sampling_rules, rollout.batch_dialogues
(dialogues sampled together), rollout.max_dialogue_tokens (sequence length),
rollout.max_turn_tokens, rl.mini_batches or rl.mini_batch_size (sequences per update
step), rl.micro_batch_size, rollout.max_prefill_tokens (longest policy prefill, default
2048).

The programs use the model's own attention (models/attention.py; "auto" is the blockwise
flash-style path on CPU), so no [batch, heads, T, S] score tensor is planned; the table
shows prefill and decode scratch separately.

CPU artefact: XLA's CPU backend has no bfloat16 matmul, so it converts the bfloat16 weight
stack to float32 (hoisted out of the layer loop) inside every bfloat16 sampler program; TPU
and GPU compilers multiply bfloat16 natively. The planner sizes that copy (float32 bytes of
the layer kernels per device), confirms it with a probe program (the layer scan's weight
matmuls alone, same weights and layout; the copy counts only as far as the probe's scratch
shows it) and shows it as its own line. On a CPU plan for a bfloat16 model the verdict
(`peak_bytes_per_device`, `fits`) is for the target backend: the CPU peak minus that copy,
bounded by the program's scratch. `cpu_compiler_peak_bytes_per_device` keeps the
CPU compiler's own number.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
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
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from rlver_jax import sharding as shd  # noqa: E402
from rlver_jax.models import Qwen2, Qwen2Critic, get_preset  # noqa: E402
from rlver_jax.models.qwen2 import KVCache  # noqa: E402
from rlver_jax.rl.update import (TrainBatch, UpdateSettings, critic_step,  # noqa: E402
                                 init_train_state, make_optimizer, policy_step)
from rlver_jax.sampling.sampler import (EXTENSION_BLOCK, Sampler,  # noqa: E402
                                        capacity_bucket, next_power_of_two)

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """What the planner needs from a config (see the module docstring for the fields)."""

    policy_preset: str
    policy_dtype: str = "bfloat16"
    policy_param_dtype: str | None = None     # None: policy_dtype
    policy_remat: str | None = None           # None: the preset's
    simulator_preset: str | None = None
    simulator_dtype: str = "bfloat16"
    policy_attention: str = "auto"             # models/attention.py implementation
    simulator_attention: str = "auto"
    simulator_prompt_tokens: int | None = None  # None: seq_len - turn_tokens
    simulator_new_tokens: int | None = None     # None: turn_tokens
    # Kept per dialogue across turns: two caches (analyzer, actor). Each continuation
    # compacts its cache to the kept tokens (at most the prompt cap), one extension block
    # and the new tokens (`Sampler.generate`), so that is each cache's size.
    simulator_reuse_cache: bool = True
    critic: bool = False
    critic_dtype: str | None = None            # None: policy_dtype
    critic_param_dtype: str | None = None      # None: the policy's param dtype
    reference: bool = False
    mesh_shape: tuple[int, int, int] = (1, -1, 1)
    rules: Any = "fsdp_tensor"
    sampling_rules: Any = "sampling"
    batch: int = 8                 # sequences per update step (one mini-batch)
    seq_len: int = 2048            # tokens per sequence (a whole dialogue)
    micro_batch: int = 0           # 0: the whole mini-batch at once
    turn_tokens: int = 256         # new tokens per sampled turn
    # Longest prefill of the policy: the opening prompt, or a user turn appended to the
    # cached dialogue (continuations never re-prefill the whole dialogue).
    policy_prefill_tokens: int = 2048
    sampling_batch: int | None = None  # dialogues sampled together; None: batch


def _get(cfg, dotted: str, default=None):
    node = cfg
    for key in dotted.split("."):
        if node is None:
            return default
        try:
            node = node[key] if isinstance(node, Mapping) else getattr(node, key)
        except (KeyError, AttributeError):
            return default
    return default if node is None else node


def settings_from_config(cfg) -> PlanSettings:
    """Reads the planner's fields from an ml_collections config (missing ones: defaults).

    Follows configs/base.py: the critic exists for PPO (or `critic.enabled`), the
    simulator when `simulator.kind` is "llm", the reference when a KL term is on; the
    update batch is `rollout.batch_dialogues / rl.mini_batches` (or `rl.mini_batch_size`).
    """
    rules = _get(cfg, "mesh.rules", "fsdp_tensor")
    sampling_rules = _get(cfg, "mesh.sampling_rules", "sampling")
    to_plain = lambda r: r if isinstance(r, str) else dict(r)
    kl = max(float(_get(cfg, "rl.kl_loss_coef", 0.0) or 0.0),
             float(_get(cfg, "rl.kl_reward_coef", 0.0) or 0.0))
    dialogues = int(_get(cfg, "rollout.batch_dialogues", 8))
    mini = int(_get(cfg, "rl.mini_batch_size", 0) or 0)
    if not mini:
        mini = max(dialogues // max(int(_get(cfg, "rl.mini_batches", 1) or 1), 1), 1)
    critic = _get(cfg, "critic.enabled")
    if critic is None:
        critic = str(_get(cfg, "rl.algorithm", "grpo")) == "ppo"
    simulator = _get(cfg, "simulator.preset") or None
    if str(_get(cfg, "simulator.kind", "llm")) != "llm":
        simulator = None
    turn = int(_get(cfg, "rollout.max_turn_tokens", 256))
    return PlanSettings(
        policy_preset=str(_get(cfg, "policy.preset")),
        policy_dtype=str(_get(cfg, "policy.dtype", "bfloat16")),
        policy_param_dtype=_get(cfg, "policy.param_dtype"),
        policy_remat=_get(cfg, "policy.remat"),
        simulator_preset=simulator,
        simulator_dtype=str(_get(cfg, "simulator.dtype", "bfloat16")),
        policy_attention=str(_get(cfg, "policy.attention", "auto")),
        simulator_attention=str(_get(cfg, "simulator.attention", "auto")),
        simulator_prompt_tokens=_get(cfg, "simulator.max_prompt_tokens"),
        simulator_new_tokens=max(int(_get(cfg, "simulator.max_analyzer_tokens", 0) or 0),
                                 int(_get(cfg, "simulator.max_actor_tokens", 0) or 0)) or turn,
        simulator_reuse_cache=bool(_get(cfg, "simulator.reuse_cache", True)),
        critic=bool(critic),
        critic_dtype=_get(cfg, "critic.dtype"),
        critic_param_dtype=_get(cfg, "critic.param_dtype"),
        reference=bool(_get(cfg, "reference.enabled", False)) or kl > 0,
        mesh_shape=tuple(int(s) for s in _get(cfg, "mesh.shape", (1, -1, 1))),
        rules=to_plain(rules), sampling_rules=to_plain(sampling_rules),
        batch=mini,
        seq_len=int(_get(cfg, "rollout.max_dialogue_tokens", 2048)),
        micro_batch=int(_get(cfg, "rl.micro_batch_size", 0) or 0),
        turn_tokens=turn,
        policy_prefill_tokens=int(_get(cfg, "rollout.max_prefill_tokens", 2048)),
        sampling_batch=dialogues)


def _model_config(preset: str, dtype: str, param_dtype: str | None, remat: str | None):
    overrides = {"dtype": dtype, "param_dtype": param_dtype or dtype}
    if remat:
        overrides["remat"] = remat
    return get_preset(preset, **overrides)


def _memory(compiled) -> dict[str, int]:
    stats = compiled.memory_analysis()
    if stats is None:  # some backends do not report
        return {"temp": 0, "argument": 0, "output": 0, "alias": 0}
    return {"temp": int(stats.temp_size_in_bytes),
            "argument": int(stats.argument_size_in_bytes),
            "output": int(stats.output_size_in_bytes),
            "alias": int(stats.alias_size_in_bytes)}


def plan_update(config, mesh, rules, batch: int, seq_len: int, micro_batch: int,
                kind: str = "policy") -> dict[str, Any]:
    """Compiles the update step of the policy (or critic) on abstract inputs.

    Returns per-device bytes: params, opt_state (Adam moments, same layout as the
    params), batch, temp (the compiled step's scratch: activations, gradients, gathered
    weights), and the compile time.
    """
    cls = Qwen2 if kind == "policy" else Qwen2Critic
    build = lambda: cls(config, rngs=nnx.Rngs(0))
    model_abs = nnx.eval_shape(build)
    tx = make_optimizer(1e-6, 1000)
    state_abs = jax.eval_shape(lambda: init_train_state(build(), tx))
    state_shardings = shd.tree_shardings(state_abs, mesh, rules)
    state_in = shd.abstract_with_shardings(state_abs, state_shardings)
    row = shd.batch_sharding(mesh, 2, rules, batch)
    arr = lambda dtype: jax.ShapeDtypeStruct((batch, seq_len), dtype, sharding=row)
    batch_in = TrainBatch(tokens=arr(jnp.int32), attention_mask=arr(jnp.int32),
                          loss_mask=arr(jnp.int32), old_logp=arr(jnp.float32),
                          ref_logp=arr(jnp.float32), advantages=arr(jnp.float32),
                          returns=arr(jnp.float32), old_values=arr(jnp.float32))
    # The program `Updater.step` runs: the step function with the state donated and its
    # layout pinned on the way out.
    graphdef = nnx.graphdef(model_abs)
    settings = UpdateSettings(micro_batch_size=micro_batch)
    step_fn = policy_step if kind == "policy" else critic_step
    step = jax.jit(lambda state, batch: step_fn(graphdef, tx, settings, state, batch),
                   donate_argnums=(0,), out_shardings=(state_shardings, None))
    start = time.perf_counter()
    with jax.set_mesh(mesh), shd.logical_rules(rules):
        compiled = step.lower(state_in, batch_in).compile()
    return {
        "params": shd.bytes_per_device(state_in.params),
        "opt_state": shd.bytes_per_device((state_in.step, state_in.opt_state)),
        "batch": shd.bytes_per_device(batch_in),
        "temp": _memory(compiled)["temp"],
        "compile_s": round(time.perf_counter() - start, 2),
    }


def abstract_cache(config, mesh, rules, batch: int, capacity: int) -> KVCache:
    """The sampler's KV cache as sharded ShapeDtypeStructs (the layout of `_new_cache`)."""
    mesh_shape = dict(mesh.shape)
    shape = (config.num_layers, batch, capacity, config.num_kv_heads,
             config.resolved_head_dim)
    kv_spec = shd.logical_to_spec((None, "batch", "cache_length", "kv_heads", "head_dim"),
                                  shape, mesh_shape, rules)
    kv = jax.ShapeDtypeStruct(shape, config.jnp_dtype,
                              sharding=jax.sharding.NamedSharding(mesh, kv_spec))
    rows = lambda ndim: shd.batch_sharding(mesh, ndim, rules, batch)
    return KVCache(k=kv, v=kv,
                   valid=jax.ShapeDtypeStruct((batch, capacity), jnp.bool_, sharding=rows(2)),
                   index=jax.ShapeDtypeStruct((), jnp.int32, sharding=shd.replicated(mesh)),
                   next_position=jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows(1)))


def cpu_weight_upcast(config, mesh, rules, weights_in) -> int:
    """The float32 copy of the bfloat16 layer weights that the CPU backend's matmuls make:
    the copy's size (float32 bytes of the stacked layer kernels per device), counted only
    as far as a probe shows it: the scratch of a program that just multiplies an activation
    row by every layer kernel in a scan over the stacked weights, as the model does (the
    probe also holds small buffers of its own, so its scratch bounds the copy from above).
    0 for float32 models."""
    if config.jnp_dtype == jnp.float32:
        return 0
    stacked = weights_in["layers"]
    kernels = {n: v for n, v in stacked.items() if len(v.shape) >= 3}

    def probe(stack):
        def body(total, layer):
            for w in layer.values():
                row = jnp.ones((1, w.shape[0]), config.jnp_dtype)
                total = total + jnp.sum(jnp.einsum(
                    "BD,D...->B...", row, w, preferred_element_type=jnp.float32))
            return total, None
        return jax.lax.scan(body, jnp.zeros((), jnp.float32), stack)[0]

    with jax.set_mesh(mesh), shd.logical_rules(rules):
        compiled = jax.jit(probe).lower(kernels).compile()
    f32_copy = shd.bytes_per_device(kernels) * 4 // config.jnp_dtype.itemsize
    return min(_memory(compiled)["temp"], f32_copy)


def plan_sampler(config, mesh, rules, batch: int, prompt_len: int, new_tokens: int,
                 capacity: int | None = None, round_capacity: bool = True) -> dict[str, Any]:
    """Compiles the sampler's prefill and decode programs on abstract inputs.

    Shapes follow `Sampler.generate`: batch, prompt width and new-token count rounded up
    to powers of two; cache capacity the next power of two of max(`capacity`, width + new
    tokens) (a continued dialogue grows its cache to the whole dialogue), or with
    `round_capacity=False` that maximum as it is (`capacity` already a sampler bucket).
    """
    model_abs = nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0)))
    weights = nnx.state(model_abs)
    weights_in = shd.abstract_with_shardings(weights, shd.tree_shardings(weights, mesh, rules))
    b = next_power_of_two(batch)
    width = next_power_of_two(prompt_len, 16)
    new_bucket = next_power_of_two(new_tokens)
    capacity = max(capacity or 0, width + new_bucket)
    if round_capacity:
        capacity = next_power_of_two(capacity)
    cache_in = abstract_cache(config, mesh, rules, b, capacity)
    rows = lambda shape, dtype: jax.ShapeDtypeStruct(
        shape, dtype, sharding=shd.batch_sharding(mesh, len(shape), rules, b))
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=shd.replicated(mesh))
    sampler = Sampler(model_abs, mesh=mesh)
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), b))
    keys = jax.ShapeDtypeStruct(keys.shape, keys.dtype, sharding=shd.replicated(mesh))
    stops = jax.ShapeDtypeStruct((sampler.max_stop_tokens,), jnp.int32,
                                 sharding=shd.replicated(mesh))
    start = time.perf_counter()
    with jax.set_mesh(mesh), shd.logical_rules(rules):
        prefill = sampler._prefill.lower(weights_in, cache_in, rows((b, width), jnp.int32),
                                         rows((b, width), jnp.bool_)).compile()
        decode = sampler._decode.lower(
            weights_in, cache_in, rows((b, config.vocab_size), jnp.float32),
            rows((b,), jnp.bool_), keys, scalar(jnp.int32), stops, scalar(jnp.float32),
            scalar(jnp.int32), scalar(jnp.float32), max_new_bucket=new_bucket).compile()
    upcast = 0
    if mesh.devices.flat[0].platform == "cpu":
        upcast = cpu_weight_upcast(config, mesh, rules, weights_in)
    return {
        "params": shd.bytes_per_device(weights_in),
        "kv_cache": shd.bytes_per_device(cache_in),
        "cpu_weight_upcast": upcast,
        "prefill_temp": _memory(prefill)["temp"],
        "decode_temp": _memory(decode)["temp"],
        "temp": max(_memory(prefill)["temp"], _memory(decode)["temp"]),
        "shape": {"batch": b, "prompt": width, "new_tokens": new_bucket,
                  "capacity": capacity},
        "compile_s": round(time.perf_counter() - start, 2),
    }


def _same_layout(config, mesh, rules_a, rules_b) -> bool:
    state = nnx.state(nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0))))
    specs = lambda r: [s.spec for s in jax.tree.leaves(shd.tree_shardings(state, mesh, r))]
    return specs(rules_a) == specs(rules_b)


def plan(settings: PlanSettings, devices=None, device_memory_bytes: int | None = None
         ) -> dict[str, Any]:
    """Per-device memory of one training setup: a JSON-ready dict (bytes).

    Phases: `update` (policy step: resident models + the step's scratch) and `rollout`
    (resident models + the policy's sampling-layout copy + both KV caches + the larger
    sampler scratch). The simulator stays resident in its sampling layout.
    """
    s = settings
    mesh = shd.make_mesh(s.mesh_shape, devices)
    rules = shd.get_rules(s.rules)
    sampling_rules = shd.get_rules(s.sampling_rules)
    policy_cfg = _model_config(s.policy_preset, s.policy_dtype, s.policy_param_dtype,
                               s.policy_remat).replace(attention=s.policy_attention)
    prompt_len = max(min(s.seq_len - s.turn_tokens, s.policy_prefill_tokens), 1)
    sampling_batch = s.sampling_batch or s.batch
    out: dict[str, Any] = {
        "devices": mesh.size,
        "platform": mesh.devices.flat[0].platform,
        "mesh": dict(mesh.shape),
        "rules": s.rules, "sampling_rules": s.sampling_rules,
        "settings": dataclasses.asdict(s),
    }
    policy = plan_update(policy_cfg, mesh, rules, s.batch, s.seq_len, s.micro_batch)
    policy.update(param_dtype=policy_cfg.param_dtype, dtype=policy_cfg.dtype)
    # The sampler reads a copy of the policy in its compute dtype (Trainer.sampling_view);
    # it shares the training arrays only when their dtype and layout are already those.
    sample_cfg = policy_cfg.replace(remat="none", param_dtype=policy_cfg.dtype)
    policy["sampler"] = plan_sampler(sample_cfg, mesh, sampling_rules, sampling_batch,
                                     prompt_len, s.turn_tokens, capacity=s.seq_len)
    shared = (policy_cfg.param_dtype == policy_cfg.dtype
              and _same_layout(policy_cfg, mesh, rules, sampling_rules))
    policy["sampling_copy"] = 0 if shared else policy["sampler"]["params"]
    out["policy"] = policy
    resident = policy["params"] + policy["opt_state"]
    update_scratch = policy["temp"] + policy["batch"]
    if s.critic:
        critic_cfg = policy_cfg.replace(
            dtype=s.critic_dtype or policy_cfg.dtype,
            param_dtype=s.critic_param_dtype or policy_cfg.param_dtype)
        critic = plan_update(critic_cfg, mesh, rules, s.batch, s.seq_len, s.micro_batch,
                             kind="critic")
        out["critic"] = critic
        resident += critic["params"] + critic["opt_state"]
        update_scratch = max(update_scratch, critic["temp"] + critic["batch"])
    if s.reference:
        ref_cfg = policy_cfg.replace(param_dtype=policy_cfg.dtype)  # never trained
        ref_state = nnx.state(nnx.eval_shape(lambda: Qwen2(ref_cfg, rngs=nnx.Rngs(0))))
        ref_in = shd.abstract_with_shardings(ref_state,
                                             shd.tree_shardings(ref_state, mesh, rules))
        out["reference"] = {"params": shd.bytes_per_device(ref_in)}
        resident += out["reference"]["params"]
    rollout = policy["sampling_copy"] + policy["sampler"]["kv_cache"]
    # Scratch on the target backend: the CPU compiler's weight upcast taken out.
    target_scratch = lambda sampler: sampler["temp"] - min(sampler["cpu_weight_upcast"],
                                                           sampler["temp"])
    sampler_scratch = policy["sampler"]["temp"]
    target_sampler_scratch = target_scratch(policy["sampler"])
    if s.simulator_preset:
        sim_cfg = _model_config(s.simulator_preset, s.simulator_dtype, None,
                                "none").replace(attention=s.simulator_attention)
        sim_prompt = s.simulator_prompt_tokens or max(s.seq_len - s.turn_tokens, 1)
        sim_new = s.simulator_new_tokens or s.turn_tokens
        new_bucket = next_power_of_two(sim_new)
        if s.simulator_reuse_cache:
            # A compacted continuation: kept tokens (under the prompt cap) + one extension
            # block + the new tokens. (A row whose kept tokens are near the cap while
            # another row's extension is long can need more: rows share one write index.)
            capacity = capacity_bucket(sim_prompt + EXTENSION_BLOCK + new_bucket)
        else:
            capacity = capacity_bucket(next_power_of_two(sim_prompt, 16) + new_bucket)
        streams = 2 if s.simulator_reuse_cache else 1
        sim = plan_sampler(sim_cfg, mesh, sampling_rules, sampling_batch, sim_prompt, sim_new,
                           capacity=capacity, round_capacity=False)
        sim["kv_cache_streams"] = streams
        out["simulator"] = sim
        resident += sim["params"]
        rollout += streams * sim["kv_cache"]
        sampler_scratch = max(sampler_scratch, sim["temp"])
        target_sampler_scratch = max(target_sampler_scratch, target_scratch(sim))
    out["resident_bytes_per_device"] = resident
    out["update_peak_bytes_per_device"] = resident + update_scratch
    out["cpu_compiler_rollout_peak_bytes_per_device"] = resident + rollout + sampler_scratch
    out["rollout_peak_bytes_per_device"] = resident + rollout + target_sampler_scratch
    out["cpu_compiler_peak_bytes_per_device"] = max(
        out["update_peak_bytes_per_device"],
        out["cpu_compiler_rollout_peak_bytes_per_device"])
    # The verdict's number: the target backend's (equal to the CPU compiler's on a real
    # accelerator or for float32 models, where no upcast is measured).
    out["peak_bytes_per_device"] = max(out["update_peak_bytes_per_device"],
                                       out["rollout_peak_bytes_per_device"])
    out["params_bytes_per_device"] = policy["params"]
    out["opt_state_bytes_per_device"] = policy["opt_state"]
    if device_memory_bytes:
        out["device_memory_bytes"] = device_memory_bytes
        out["fits"] = out["peak_bytes_per_device"] <= device_memory_bytes
    return out


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
    config = flags.FLAGS.config
    if config is None:
        exit_with("--config FILE is required", 2)
    try:
        settings = settings_from_config(config)
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
    result = plan(settings, _plan_devices(flags.FLAGS.devices),
                  device_memory_bytes=int(memory * GiB) if memory else None)
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
        config_flags.DEFINE_config_file("config", None, "ml-collections config file.",
                                        lock_config=False)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        print(config_error(e, sys.argv), file=sys.stderr)
        sys.exit(2)
    flags.DEFINE_integer("devices", None, "Plan for this many devices (fake CPU devices "
                         "when fewer exist).")
    flags.DEFINE_float("device_memory_gib", None, "Memory per device, for a fits / does "
                       "not fit verdict (e.g. 95 for TPU v5p, 80 for H100).")
    flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
    app.run(main, flags_parser=parse_flags_or_exit)
