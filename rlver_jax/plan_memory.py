"""Per-device memory of a training setup, measured on compiled programs.

What is resident, as the trainer holds it: the trained models' master weights in
`param_dtype` (float32) with two Adam moments of the same dtype, the policy's sampling
copy in its compute dtype (`dtype`; none when the masters already are in that dtype and
layout), and the never-trained simulator / reference in their compute dtype.

The real programs are compiled ahead of time on abstract inputs:
`jax.jit(...).lower(ShapeDtypeStruct with shardings).compile()` allocates nothing, and
`memory_analysis()` of the compiled SPMD program gives the per-device scratch ("temp")
bytes. Parameter, optimiser-state and KV-cache bytes come from the shardings themselves
(shard shape x item size, the largest device).

The programs use the model's own attention (models/attention.py; "auto" is the blockwise
flash-style path on CPU), so no [batch, heads, T, S] score tensor is planned; prefill and
decode scratch are reported separately.

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
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rlver_jax import sharding as shd
from rlver_jax.models import Qwen2, Qwen2Critic, get_preset
from rlver_jax.models.qwen2 import KVCache
from rlver_jax.rl.update import (TrainBatch, UpdateSettings, critic_step, init_train_state,
                                 make_optimizer, policy_step)
from rlver_jax.sampling.continuation import stream_capacity
from rlver_jax.sampling.sampler import Sampler, capacity_bucket, next_power_of_two

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """What the planner measures (`rlver_jax.plan.settings_from_config` reads it from a
    training config)."""

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
    if round_capacity:  # False: `capacity` is already a sampler bucket
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
        prefill = sampler.lower_prefill(weights_in, cache_in, rows((b, width), jnp.int32),
                                        rows((b, width), jnp.bool_)).compile()
        decode = sampler.lower_decode(
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


def plan(settings: PlanSettings, layout, device_memory_bytes: int | None = None
         ) -> dict[str, Any]:
    """Per-device memory of one training setup on `layout` (a `rlver_jax.build.Layout`:
    the mesh and the training / sampling rule tables): a JSON-ready dict (bytes).

    Phases: `update` (policy step: resident models + the step's scratch) and `rollout`
    (resident models + the policy's sampling-layout copy + both KV caches + the larger
    sampler scratch). The simulator stays resident in its sampling layout.
    """
    s = settings
    mesh, rules, sampling_rules = layout.mesh, layout.rules, layout.sampling_rules
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
    # The sampler reads a copy of the policy in its compute dtype (build.sampling_view);
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
            # The LLM user sizes each stream for its prompt cap from the first call: kept
            # tokens + one extension block + the new tokens. (A row whose kept tokens are
            # near the cap while another row's extension is long can need more: rows share
            # one write index.)
            capacity = capacity_bucket(stream_capacity(sim_prompt, sim_new))
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
