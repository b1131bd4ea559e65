"""The full RL step (`train.train_step`): throughput, where the time goes, recompilations.

    python -m benchmarks.rl_step --quick        # tiny_llm + tiny, 1 warm-up + 3 steps each
    python -m benchmarks.rl_step --config configs/tiny_llm.py --steps 6
    python -m benchmarks.rl_step --config configs/tiny_llm.py --simulator_reuse on off

Per config (`configs/tiny_llm.py`: policy + in-process LLM simulator; `configs/tiny.py`:
rule user), the trainer runs `--warmup` steps, then `--steps` measured steps. Reported,
averaged over the measured steps that compiled nothing (all measured steps if every one
compiled; `averaged_steps` names them):

  tokens_per_s             (policy + simulator generated tokens) / step time
  policy_tokens_per_s      policy-generated tokens / step time
  time                     seconds per step in policy sampling, simulator sampling, the
                           rest of the rollout (tokenising, parsing, bookkeeping), old /
                           reference log-probs + advantages (`logprobs`), and the update
  compiles_per_step        XLA compilations per measured step, all programs (counted with a
                           `jax.monitoring` listener on backend-compile events), with the
                           names of the compiled functions; the goal is 0 after warm-up
  sampler_programs         `compile/sampler_programs` after each step (flat = no new
                           sampler shapes)
  simulator_reuse_frac     share of the simulator's prompt tokens served from its KV
                           cache (`rollout/simulator_reused_tokens` over reused + prefilled);
                           `--simulator_reuse on off` measures an LLM config with
                           `simulator.reuse_cache` on and off (`config.simulator_reuse_cache`)

There is no peer: no other stack runs this loop (RLVER's reference implementation is a
multi-process Ray/vLLM job). `peer` fields are None; `timing` holds the spread of the
averaged steps' wall times.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import time

from benchmarks import common

CONFIGS = ("configs/tiny_llm.py", "configs/tiny.py")
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA backend compilations (every jitted program, cache misses only).

    A listener on jax.monitoring's backend-compile event: it sees compilations from any
    module (sampler, trainer, optax, jnp helpers), unlike a per-object counter.
    """

    def __init__(self):
        self.names: list[str] = []
        self.seconds = 0.0
        self._registered = False

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == _COMPILE_EVENT:
            self.names.append(str(kwargs.get("fun_name", "?")))
            self.seconds += duration

    def __enter__(self) -> "CompileCounter":
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(self._listener)
        self._registered = True
        return self

    def __exit__(self, *exc) -> None:
        import jax.monitoring

        if self._registered:
            jax.monitoring.unregister_event_duration_listener(self._listener)
            self._registered = False

    @property
    def count(self) -> int:
        return len(self.names)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", nargs="+", default=list(CONFIGS),
                   help="trainer config files (ml-collections get_config())")
    p.add_argument("--warmup", type=int, default=1, help="steps before measuring")
    p.add_argument("--steps", type=int, default=4, help="measured steps")
    p.add_argument("--quick", action="store_true", help="1 warm-up step + 3 measured steps")
    p.add_argument("--simulator_reuse", nargs="+", default=["on"], choices=("on", "off"),
                   help="simulator.reuse_cache settings to measure LLM-simulator configs at")
    p.add_argument("--results_dir", default=None)
    p.add_argument("--no_save", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 3
    return args


def _load_config(path: str):
    import importlib.util

    if not os.path.exists(path):  # relative to the repository root
        path = os.path.join(os.path.dirname(common.RESULTS_DIR), os.pardir, path)
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


class TrainerRun:
    """One config's trainer, stepped from outside so that two settings can alternate."""

    def __init__(self, path: str, total_steps: int, simulator_reuse: bool = True):
        import jax

        from rlver_jax import build
        from rlver_jax import sharding as sharding_lib
        from rlver_jax.step import States
        from rlver_jax.train import make_programs

        config = _load_config(path)
        config.simulator.reuse_cache = simulator_reuse
        config.total_steps = max(config.total_steps, total_steps)
        config.log.plots = False
        self.config = config
        self.name = os.path.splitext(os.path.basename(path))[0]
        self.label = f"{self.name}, reuse {'on' if simulator_reuse else 'off'}"
        t0 = time.perf_counter()
        self.parts = build.build(config)
        self.programs = make_programs(self.parts)
        self.states = States(self.parts.policy_state, self.parts.critic_state)
        self.build_s = time.perf_counter() - t0
        self._mesh = lambda: jax.set_mesh(self.parts.layout.mesh)
        self._rules = lambda: sharding_lib.logical_rules(self.parts.layout.rules)
        self.per_step: list[dict] = []

    def step(self, step: int, compiles: CompileCounter) -> dict:
        """Runs trainer step `step`; returns (and keeps) its wall time, metrics, compiles."""
        from rlver_jax.train import train_step

        before, before_s = compiles.count, compiles.seconds
        # train_step expects the mesh and logical rules that train() sets around it.
        with self._mesh(), self._rules():
            t0 = time.perf_counter()
            self.states, metrics, _ = train_step(self.parts, self.programs, self.states,
                                                 step)
            wall = time.perf_counter() - t0
        self.per_step.append({
            "step": step, "wall_s": wall, "metrics": metrics,
            "compiles": compiles.count - before, "compile_s": compiles.seconds - before_s,
            "compiled": sorted(collections.Counter(compiles.names[before:]).items()),
        })
        s = self.per_step[-1]
        print(f"rl_step {self.label} step {step}: {wall:.2f}s (simulator "
              f"{metrics.get('time/simulator_s', 0.0):.2f}s), {s['compiles']} compiles "
              f"({s['compile_s']:.1f}s), sampler programs "
              f"{metrics['compile/sampler_programs']:.0f}", flush=True)
        return s

    def release(self) -> None:
        del self.parts, self.programs, self.states

    def record(self, warmup: int, steps: int, machine: dict) -> dict:
        """The benchmark record over this trainer's steps so far."""
        return _record(self.config, self.name, self.per_step, warmup, steps, self.build_s,
                       machine)


def measure_config(path: str, warmup: int, steps: int, machine: dict,
                   simulator_reuse: bool = True) -> dict:
    """Runs warm-up + measured trainer steps of one config; returns one record."""
    with CompileCounter() as compiles:
        trainer = TrainerRun(path, warmup + steps, simulator_reuse)
        for step in range(warmup + steps):
            trainer.step(step, compiles)
        trainer.release()
    return trainer.record(warmup, steps, machine)


def measure_interleaved(path: str, settings: list[bool], warmup: int, steps: int,
                        machine: dict) -> list[dict]:
    """Both reuse settings in one process, their steps alternating (ABBA order).

    The machine's speed drifts by tens of percent over minutes; stepping the settings one
    after the other would put the drift on one side. Each record gets `interleaved_with`
    and the per-step paired simulator-time ratios (`simulator_s_paired`).
    """
    with CompileCounter() as compiles:
        trainers = [TrainerRun(path, warmup + steps, reuse) for reuse in settings]
        for step in range(warmup + steps):
            for trainer in (trainers if step % 2 == 0 else trainers[::-1]):
                trainer.step(step, compiles)
        for trainer in trainers:
            trainer.release()
    records = [t.record(warmup, steps, machine) for t in trainers]
    simulator_s = [[s["metrics"]["time/simulator_s"] for s in t.per_step[warmup:]]
                   for t in trainers]
    for i, record in enumerate(records):
        others = [j for j in range(len(records)) if j != i]
        record["interleaved_with"] = [_label(records[j]) for j in others]
        # The other setting's simulator time over this one's, step by step: each pair ran
        # back to back under the same load.
        record["simulator_s_paired"] = [
            {"with": _label(records[j]), "steps": list(range(warmup, warmup + steps)),
             **common.ratio_spread(simulator_s[i], simulator_s[j])} for j in others]
    return records


def _label(record: dict) -> str:
    c = record["config"]
    return f"{c['config']}, reuse {'on' if c['simulator_reuse_cache'] else 'off'}"


def _record(c, name: str, per_step: list[dict], warmup: int, steps: int, build_s: float,
            machine: dict) -> dict:
    measured = per_step[warmup:]
    # A step that compiled measures the compiler, not the loop: average the steady-state
    # numbers over the compile-free measured steps when there are any (the compile counts
    # below still cover every measured step).
    steady = [s for s in measured if s["compiles"] == 0] or measured
    m = [s["metrics"] for s in steady]
    step_s = _mean(x["time/step_s"] for x in m)
    policy_tokens = _mean(x["tokens/policy"] for x in m)
    sim_tokens = _mean(x.get("tokens/simulator", 0.0) for x in m)
    rollout = _mean(x["time/rollout_s"] for x in m)
    policy_s = _mean(x["time/policy_sampling_s"] for x in m)
    sim_s = _mean(x["time/simulator_s"] for x in m)
    sim_prefill = _mean(x.get("rollout/simulator_prefill_tokens", 0.0) for x in m)
    sim_reused = _mean(x.get("rollout/simulator_reused_tokens", 0.0) for x in m)
    time_split = {
        "step_s": step_s, "rollout_s": rollout, "policy_sampling_s": policy_s,
        "simulator_s": sim_s, "rollout_other_s": rollout - policy_s - sim_s,
        "logprobs_s": _mean(x["time/logprobs_s"] for x in m),
        "update_s": _mean(x["time/update_s"] for x in m),
    }
    time_split["other_s"] = step_s - rollout - time_split["logprobs_s"] - time_split["update_s"]
    sampler_programs = [s["metrics"]["compile/sampler_programs"] for s in per_step]
    record = common.base_record(
        "rl_step", {"config": name, "policy": c.policy.preset, "simulator": c.simulator.kind,
                    "simulator_preset": c.simulator.preset if c.simulator.kind == "llm"
                    else None, "batch_dialogues": c.rollout.batch_dialogues,
                    "group_size": c.rollout.group_size, "algorithm": c.rl.algorithm,
                    "max_turn_tokens": c.rollout.max_turn_tokens, "dtype": c.policy.dtype,
                    "warmup_steps": warmup, "steps": steps,
                    "simulator_reuse_cache": bool(c.simulator.reuse_cache)}, machine)
    record.update(
        tokens_per_s=(policy_tokens + sim_tokens) / step_s,
        policy_tokens_per_s=policy_tokens / step_s,
        policy_tokens_per_step=policy_tokens, simulator_tokens_per_step=sim_tokens,
        turns_mean=_mean(x.get("turns/mean") for x in m), time_split=time_split,
        simulator_prefill_tokens_per_step=sim_prefill,
        simulator_reused_tokens_per_step=sim_reused,
        simulator_reuse_frac=(sim_reused / (sim_prefill + sim_reused)
                              if sim_prefill + sim_reused else None),
        averaged_steps=[s["step"] for s in steady],
        per_step=[{"step": s["step"], "wall_s": s["wall_s"], "compiles": s["compiles"],
                   "compile_s": s["compile_s"],
                   **{k: s["metrics"][k] for k in ("time/rollout_s", "time/policy_sampling_s",
                                                   "time/simulator_s", "time/logprobs_s",
                                                   "time/update_s", "tokens/policy",
                                                   "tokens/simulator",
                                                   "rollout/simulator_prefill_tokens",
                                                   "rollout/simulator_reused_tokens",
                                                   "rollout/policy_prefill_tokens",
                                                   "rollout/policy_reused_tokens")
                      if k in s["metrics"]}}
                  for s in per_step],
        first_step_s=per_step[0]["wall_s"], build_s=build_s,
        compile_s=sum(s["compile_s"] for s in per_step[:warmup]),
        compiles_first_steps=[s["compiles"] for s in per_step[:warmup]],
        compiles_per_step=[s["compiles"] for s in measured],
        compiles_per_step_after_warmup=_mean(s["compiles"] for s in measured),
        compiled_after_warmup=[s["compiled"] for s in measured if s["compiled"]],
        sampler_programs=sampler_programs,
        sampler_programs_flat_after_first=len(set(sampler_programs)) == 1,
        # No peer to interleave with; the spread of the averaged steps' wall times.
        timing={"ours": common.spread([s["wall_s"] for s in steady])},
        peer=None, peer_tokens_per_s=None, ratio=None)
    record["peak_rss_bytes"] = common.peak_rss_bytes()
    record["device_memory_bytes"] = common.device_memory_bytes()
    return record


def _summary(record: dict) -> str:
    t, frac = record["time_split"], record["simulator_reuse_frac"]
    return (f"rl_step {_label(record)}: {record['tokens_per_s']:.1f} tok/s all, "
            f"{record['policy_tokens_per_s']:.1f} policy tok/s, step {t['step_s']:.2f}s "
            f"(policy {t['policy_sampling_s']:.2f}, simulator {t['simulator_s']:.2f}, "
            f"log-probs {t['logprobs_s']:.2f}, update {t['update_s']:.2f}), "
            + (f"simulator prompt tokens reused {frac:.0%}, " if frac is not None else "")
            + f"compiles/step after warm-up {record['compiles_per_step_after_warmup']}")


def run(args: argparse.Namespace) -> list[dict]:
    """Measures every config; returns (and unless --no_save appends) records.

    An LLM-simulator config with two `--simulator_reuse` settings runs them interleaved.
    """
    machine = common.machine_info()
    records = []
    for path in args.config:
        llm = _load_config(path).simulator.kind == "llm"
        settings = [r == "on" for r in dict.fromkeys(args.simulator_reuse)] if llm else [True]
        if len(settings) > 1:
            found = measure_interleaved(path, settings, args.warmup, args.steps, machine)
            for record in found:
                paired = record["simulator_s_paired"][0]
                print(_summary(record) + f"; simulator time of {paired['with']} / this "
                      f"one's: {paired['ratio']:.2f}x [{paired['ratio_min']:.2f}, "
                      f"{paired['ratio_max']:.2f}] over steps paired in order", flush=True)
        else:
            found = [measure_config(path, args.warmup, args.steps, machine, settings[0])]
            print(_summary(found[0]), flush=True)
        records += found
    if not args.no_save:
        common.append_results("rl_step", records, args.results_dir)
    return records


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
