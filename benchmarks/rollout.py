"""Throughput of a full dialogue rollout: policy + in-process LLM simulator, turns and batch.

    python -m benchmarks.rollout --quick                       # tiny preset, < 3 min on 2 cores
    python -m benchmarks.rollout                               # tiny and small-100m, full grids
    python -m benchmarks.rollout --preset qwen2.5-0.5b --sim_preset qwen2.5-0.5b \\
        --dtype bfloat16 --turns 1 2 4 8 16 --batch 1 8 32     # a GPU
    python -m benchmarks.rollout --simulator_shape --preset qwen2.5-0.5b \\
        --sim_preset qwen2.5-0.5b --dtype bfloat16 --turns_batch 8  # simulator KV reuse

One rollout is `DialogueRollout.run` with the policy (no-think, or `--think`: one sample
per turn, each turn's prompt dropping the previous thought) and an `LLMUser` whose model
is a random network of `--sim_preset`: every user turn is one batched analyzer generation
and one batched actor generation, as in training. The turn count is fixed by the simulator
settings (`max_turns`, no emotion-based or goodbye ending, no parse retries: a random
analyzer never parses, so the emotion stays put and every dialogue runs to the limit).

Two sweeps: turns (`--turns`, at `--turns_batch` dialogues) and dialogues per batch
(`--batch`, at `--batch_turns` turns). Reported per configuration:

  dialogues_per_s       dialogues / median wall time of a warm rollout (compile excluded);
                        ours and the peer run interleaved (ours, peer, ours, ...) for
                        `--repeats` rounds; `timing` holds each side's spread
  tokens_per_s          policy tokens sampled / wall time
  all_tokens_per_s      policy + simulator tokens sampled / wall time
  policy_s, analyzer_s, actor_s, other_s
                        the time split (`RolloutResult.timing`; actor includes the openings;
                        other = host-side bookkeeping: tokenising, prompt rendering, parsing)
  compile_s             first call's extra time (every program of that configuration)
  peer                  "reprefill": the same rollout whose policy sampler is given no
                        `previous` state, so each turn prefills the whole dialogue again
                        instead of continuing the row's KV cache; `ratio` = peer wall / ours
  growth                (turns sweep) least-squares slope of log time vs log turns, for the
                        wall time and for policy time, ours and the peer's: 1 is linear in
                        the number of turns, 2 quadratic

`--simulator_shape` runs another sweep instead ("simulator"): the simulator's KV-cache
reuse at a realistic shape (a static prompt head padded to `--sim_head_tokens`, analyzer
`--sim_analyzer_tokens` / actor `--sim_actor_tokens` new tokens, `--turns_batch` dialogues
in GRPO groups of `--group_size`, no prompt truncation), beside the same rollout with
`SimulatorSampling.reuse_cache=False` (peer "noreuse"). Each side runs one rollout of
max(`--turns`) + 1 turns (a warm-up, then `--repeats` interleaved rounds, progress
printed); every turn count's point is read off those runs' per-call times, since nothing
in the prompts depends on the horizon. Reported per turn count T:

  simulator_prefill_tokens   prompt tokens the simulator computed (`rollout/...`)
  simulator_reused_tokens    prompt tokens served from its cache
  unique_prompt_tokens       distinct prompt tokens of the rollout's simulator calls (the
                             nodes of a prefix tree over every prompt: what a perfect prefix
                             cache computes); `prefill_over_unique` = prefill / unique
  simulator_s, peer_simulator_s, peer_simulator_prefill_tokens
                             simulator time of a T-turn dialogue (openings, T analyses,
                             T - 1 actor replies; median over rounds) and the peer's,
                             `simulator_ratio` = peer / ours
  full_turns_simulator_s     the same through the T-th actor reply (T whole user turns)
  turn_simulator_s           turn T alone (its analysis and its reply)
  compiles_after_warmup      sampler programs compiled in the timed runs (goal 0)
  growth                     log-log slopes over the turn counts of the three times, ours
                             and the peer's. Equal-cost calls give ~1.29 for T-turn
                             dialogues (1, 3, 7, 15 calls at T = 1, 2, 4, 8) and ~1 for
                             whole turns; on the tiny preset a decode step is all attention,
                             so context growth shows in full (see benchmarks/README.md)

Plots: `results/rollout_turns.png` (time vs turns, log-log, split by component, with the
peer) and `results/rollout_batch.png` (dialogues/s and tokens/s vs batch).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any, Sequence

from benchmarks import common

CPU_PRESETS = ("tiny", "small-100m")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", nargs="+", default=list(CPU_PRESETS),
                   help="policy presets: tiny / small-100m on CPU; qwen2.5-* on GPUs")
    p.add_argument("--sim_preset", default="tiny",
                   help="simulator preset ('same': the policy's preset)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--turns", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--turns_batch", type=int, default=4, help="dialogues in the turns sweep")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--batch_turns", type=int, default=4, help="turns in the batch sweep")
    p.add_argument("--turn_tokens", type=int, default=32, help="policy tokens per reply")
    p.add_argument("--sim_tokens", type=int, default=16,
                   help="tokens per analyzer and per actor generation")
    p.add_argument("--sim_prompt_tokens", type=int, default=512,
                   help="simulator prompt cap (head + tail kept), as SimulatorSampling")
    p.add_argument("--min_prompt_bucket", type=int, default=64,
                   help="smallest prefill width of the policy sampler")
    p.add_argument("--think", action="store_true",
                   help="think-then-say rollouts (the KV cache rolls back each turn)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (>= 3)")
    p.add_argument("--peer", default="reprefill", choices=("reprefill", "none"))
    p.add_argument("--peer_batch_sweep", action="store_true",
                   help="also run the re-prefill peer in the batch sweep")
    p.add_argument("--quick", action="store_true",
                   help="tiny only; turns 1/2/4/8 at 4 dialogues; batch 1/4/16 at 2 turns "
                        "(peer in the turns sweep only); 16-token replies, simulator prompts "
                        "capped at 256 tokens; 3 rounds")
    p.add_argument("--simulator_shape", action="store_true",
                   help="the simulator KV-reuse sweep (see the module doc) instead of the "
                        "turns and batch sweeps")
    p.add_argument("--sim_head_tokens", type=int, default=1500,
                   help="--simulator_shape: static prompt head (the persona padded to it)")
    p.add_argument("--sim_analyzer_tokens", type=int, default=384)
    p.add_argument("--sim_actor_tokens", type=int, default=256)
    p.add_argument("--group_size", type=int, default=4, help="--simulator_shape: GRPO group")
    p.add_argument("--results_dir", default=None)
    p.add_argument("--no_save", action="store_true")
    p.add_argument("--no_plots", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.preset, args.sim_preset = ["tiny"], "tiny"
        args.turns, args.turns_batch, args.batch, args.batch_turns = [1, 2, 4, 8], 4, [1, 4, 16], 2
        args.turn_tokens, args.sim_tokens, args.sim_prompt_tokens = 16, 16, 256
        args.repeats, args.peer_batch_sweep = 3, False
    common.check_repeats(p, args.repeats)
    if args.simulator_shape:
        args.sim_prompt_tokens = max(args.sim_prompt_tokens, 8192)  # nothing truncated
    return args


# ------------------------------------------------------------------------- the setup
class _NoContinuation:
    """The peer: the same sampler, but every call prefills its whole prompt again."""

    def __init__(self, sampler):
        self.sampler = sampler

    def generate(self, model, prompts, max_new_tokens, **kwargs):
        kwargs["previous"], kwargs["keep_state"] = None, False
        return self.sampler.generate(model, prompts, max_new_tokens, **kwargs)


class Setup:
    """Tokenizer, policy and simulator models, their samplers, and profiles of one preset."""

    def __init__(self, preset: str, args: argparse.Namespace):
        from rlver_jax.env.profiles import SHIPPED, load_profiles
        from rlver_jax.env.users import LLMUser, SimulatorSampling
        from rlver_jax.models import create_model, get_preset
        from rlver_jax.sampling import Sampler
        from rlver_jax.tokenizer import ChatTokenizer

        config = get_preset(preset, param_dtype=args.dtype, dtype=args.dtype)
        # The tiny sentencepiece vocab fits every CPU preset; Qwen presets get Qwen's.
        self.tokenizer = (ChatTokenizer.qwen25() if config.vocab_size >= 151_643
                          else ChatTokenizer.tiny())
        sim_name = preset if args.sim_preset == "same" else args.sim_preset
        sim_config = get_preset(sim_name, param_dtype=args.dtype, dtype=args.dtype)
        for name, c in ((preset, config), (sim_name, sim_config)):
            if c.vocab_size < self.tokenizer.vocab_size:
                raise SystemExit(f"preset {name} (vocab {c.vocab_size}) is too small for "
                                 f"the {self.tokenizer.name} tokenizer")
        t0 = time.perf_counter()
        self.policy = create_model(config, seed=0)
        self.simulator = create_model(sim_config, seed=1)
        self.init_s = time.perf_counter() - t0
        self.policy_sampler = Sampler(self.policy, min_prompt_bucket=args.min_prompt_bucket)
        # Same architecture: one Sampler serves both models (weights are arguments), so the
        # simulator's programs are the policy's wherever the shapes agree. The trainer keeps
        # two samplers; what runs per call is identical, only compile time differs.
        self.sim_sampler = (self.policy_sampler if sim_config == config
                            else Sampler(self.simulator))
        self.sim_sampling = SimulatorSampling(
            temperature=0.7, top_p=1.0, max_analyzer_tokens=args.sim_tokens,
            max_actor_tokens=args.sim_tokens, max_prompt_tokens=args.sim_prompt_tokens)
        self.user_cls = LLMUser
        self.profiles = load_profiles(SHIPPED["en_train"])
        self.preset, self.sim_preset, self.config = preset, sim_name, config

    def rollout(self, turns: int, turn_tokens: int, continuation: bool, think: bool = False,
                sim_sampling=None, group_size: int = 1):
        from rlver_jax.env import simulator as sim
        from rlver_jax.env.rollout import DialogueRollout, RolloutSettings

        # Fixed length: no emotion bound ends a dialogue, no goodbye level, no retries.
        cfg = sim.settings_from_config({
            "preset": "hard", "max_turns": turns, "end_below": None, "end_at_or_above": None,
            "goodbye_levels": (), "parse_retries": 0})
        user = self.user_cls(cfg, self.simulator, self.tokenizer, self.sim_sampler,
                             sim_sampling or self.sim_sampling)
        sampler = self.policy_sampler if continuation else _NoContinuation(self.policy_sampler)
        settings = RolloutSettings(max_turn_tokens=turn_tokens, max_dialogue_tokens=1 << 20,
                                   think=think, group_size=group_size)
        return DialogueRollout(self.tokenizer, user, cfg, settings, sampler), user


def _profiles(setup: Setup, batch: int) -> list:
    return [setup.profiles[i % len(setup.profiles)] for i in range(batch)]


def prepare(setup: Setup, turns: int, batch: int, turn_tokens: int, continuation: bool,
            think: bool = False):
    """A warm-up rollout (compiles); returns (first call s, a warm rollout fn, the list that
    fn appends (result, simulator tokens) to)."""
    rollout, user = setup.rollout(turns, turn_tokens, continuation, think)
    profiles = _profiles(setup, batch)
    # The same seed every time: identical work, so the warm runs reuse every program.
    t0 = time.perf_counter()
    rollout.run(setup.policy, profiles, seed=0)
    first = time.perf_counter() - t0
    runs: list = []

    def once():
        sim_tokens = user.stats["simulator_tokens"]
        result = rollout.run(setup.policy, profiles, seed=0)
        runs.append((result, user.stats["simulator_tokens"] - sim_tokens))

    return first, once, runs


def summarize(first: float, walls: list[float], runs: list, turns: int,
              batch: int) -> dict[str, Any]:
    """The measured fields of one side from its warm runs: the median run's split."""
    order = sorted(range(len(walls)), key=lambda i: walls[i])
    i = order[len(order) // 2]
    wall = statistics.median(walls)
    result, sim_tokens = runs[i]
    assert all(st.turns == turns for st in result.dialogues), "a dialogue ended early"
    policy_tokens = result.metrics["tokens/policy"]
    timing = dict(result.timing)
    return {
        "wall_s": wall, "first_s": first, "compile_s": max(first - wall, 0.0),
        "policy_s": timing["policy_s"], "analyzer_s": timing["analyzer_s"],
        "actor_s": timing["actor_s"], "other_s": walls[i] - sum(timing.values()),
        "policy_tokens": policy_tokens, "simulator_tokens": sim_tokens,
        "tokens_per_s": policy_tokens / wall,
        "all_tokens_per_s": (policy_tokens + sim_tokens) / wall,
        "dialogues_per_s": batch / wall,
        "dialogue_tokens_mean": sum(len(s.tokens) for s in result.samples) / len(result.samples),
        "wall_s_all": list(walls),
    }


def measure(setup: Setup, turns: int, batch: int, turn_tokens: int, repeats: int,
            with_peer: bool, think: bool = False):
    """Ours (continuing each row's cache) and, with a peer, the re-prefilling rollout:
    both warmed up, then `repeats` interleaved rounds (ours, peer, ours, ...).
    Returns (ours, peer or None, timing fields for the record)."""
    sides = {"ours": prepare(setup, turns, batch, turn_tokens, True, think)}
    if with_peer:
        sides["peer"] = prepare(setup, turns, batch, turn_tokens, False, think)
    times = common.time_interleaved({k: v[1] for k, v in sides.items()}, repeats)
    out = {k: summarize(first, times[k], runs, turns, batch)
           for k, (first, _, runs) in sides.items()}
    return out["ours"], out.get("peer"), common.timing_fields(times)


class _PromptTrie:
    """A prefix tree of token sequences; `size` = distinct (prefix-unique) tokens added."""

    def __init__(self):
        self.root: dict = {}
        self.size = 0

    def add(self, tokens) -> None:
        node = self.root
        for t in tokens:
            child = node.get(t)
            if child is None:
                child = node[t] = {}
                self.size += 1
            node = child


class _PromptRecorder:
    """The simulator's sampler, adding every prompt it is given to a prefix tree."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.multiprocess = False
        self.trie = _PromptTrie()

    def generate(self, model, prompts, *args, **kwargs):
        for p in prompts:
            if p is not None:
                self.trie.add(p)
        return self.sampler.generate(model, prompts, *args, **kwargs)

    def fork_groups(self, *args, **kwargs):
        return self.sampler.fork_groups(*args, **kwargs)


def padded_profiles(setup: Setup, count: int, head_tokens: int) -> list:
    """`count` profiles whose analyzer system prompt (the static head) is padded, through
    the persona, to at least `head_tokens` tokens."""
    import dataclasses

    from rlver_jax.env import simulator as sim

    cfg = sim.settings_from_config({"preset": "hard"})
    filler = (" They keep a diary, walk to work along the river, cook for friends on "
              "Sundays and find it hard to ask anyone for help.")
    out = []
    for profile in _profiles(setup, count):
        while True:
            head = sim.render_analyzer_prompt(profile, [], "hi", 30, cfg)[:1]
            n = len(setup.tokenizer.apply_chat_template(head, add_generation_prompt=False))
            if n >= head_tokens:
                break
            profile = dataclasses.replace(profile, player=profile.player + filler)
        out.append(profile)
    return out


def prepare_simulator(setup: Setup, args, horizon: int, reuse: bool):
    """A warm-up rollout of `horizon` turns at the simulator shape; returns (first call s,
    a warm rollout fn, the list that fn appends each run's simulator calls to: per call
    (kind, seconds, prefill tokens, reused tokens, distinct prompt tokens so far,
    sampler compilations so far), counters cumulative within the run)."""
    import dataclasses

    sampling = dataclasses.replace(
        setup.sim_sampling, max_analyzer_tokens=args.sim_analyzer_tokens,
        max_actor_tokens=args.sim_actor_tokens, max_prompt_tokens=args.sim_prompt_tokens,
        reuse_cache=reuse)
    recorder = _PromptRecorder(setup.sim_sampler)
    inner, setup.sim_sampler = setup.sim_sampler, recorder
    try:
        rollout, user = setup.rollout(horizon, args.turn_tokens, True, args.think, sampling,
                                      args.group_size)
    finally:
        setup.sim_sampler = inner
    calls: list = []

    def timed(kind, fn):
        def call(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)  # host lists: the sampler has synchronised
            calls.append((kind, time.perf_counter() - t0, user.stats["simulator_prefill_tokens"],
                          user.stats["simulator_reused_tokens"], recorder.trie.size,
                          inner.num_compilations))
            return out
        return call

    for kind in ("openings", "analyze", "replies"):
        setattr(user, kind, timed(kind, getattr(user, kind)))
    groups = max(args.turns_batch // args.group_size, 1)
    profiles = padded_profiles(setup, groups, args.sim_head_tokens)
    t0 = time.perf_counter()
    rollout.run(setup.policy, profiles, seed=0)
    first = time.perf_counter() - t0
    runs: list = []

    def once():
        recorder.trie = _PromptTrie()
        calls.clear()
        start = (user.stats["simulator_prefill_tokens"], user.stats["simulator_reused_tokens"],
                 inner.num_compilations)
        result = rollout.run(setup.policy, profiles, seed=0)
        assert all(st.turns == horizon for st in result.dialogues), "a dialogue ended early"
        runs.append([(k, s, p - start[0], r - start[1], u, c - start[2])
                     for k, s, p, r, u, c in calls])
        print(f"  {'reuse' if reuse else 'no reuse'} run {len(runs)}: simulator "
              f"{sum(c[1] for c in calls):.1f}s", flush=True)

    return first, once, runs


def horizon_points(calls: list, turns: Sequence[int]) -> dict[int, dict[str, float]]:
    """Per turn count T: what a rollout of T turns does, read off one longer run's calls
    (the simulator's calls up to and including the T-th analyzer call: a T-turn dialogue
    ends after its T-th analysis, and nothing in the prompts depends on the horizon), and
    `full_s`: the time through the T-th actor reply as well (T whole user turns; needs a
    run of more than T turns, else None)."""
    analyses = [i for i, c in enumerate(calls) if c[0] == "analyze"]
    replies = [i for i, c in enumerate(calls) if c[0] == "replies"]
    upto = lambda end: sum(c[1] for c in calls[:end + 1])
    out = {}
    for t in turns:
        end = analyses[t - 1]
        _, _, prefill, reused, unique, compiles = calls[end]
        out[t] = {"simulator_s": upto(end),
                  "full_s": upto(replies[t - 1]) if len(replies) >= t else None,
                  # Turn t alone: its analysis and its actor reply.
                  "turn_s": (calls[end][1] + calls[replies[t - 1]][1]
                             if len(replies) >= t else None),
                  "prefill": prefill, "reused": reused, "unique": unique,
                  "compiles": compiles}
    return out


def run_simulator_sweep(setup: Setup, args, machine) -> list[dict]:
    """One rollout of max(--turns) turns per side (reuse on: ours, off: peer), warmed up,
    then `--repeats` interleaved rounds; each turn count's point is read off the same runs
    (`horizon_points`), medians over the rounds."""
    # One turn past the largest count: its actor reply closes the last whole user turn.
    turns = sorted(set(args.turns))
    horizon = turns[-1] + 1
    sides = {}
    for name, reuse in (("ours", True), ("peer", False)):
        print(f"rollout {setup.preset} simulator: warm-up, {horizon} turns, reuse "
              f"{'on' if reuse else 'off'}", flush=True)
        sides[name] = prepare_simulator(setup, args, horizon, reuse)
    times = common.time_interleaved({k: v[1] for k, v in sides.items()}, args.repeats)
    points = {k: [horizon_points(calls, turns) for calls in sides[k][2]] for k in sides}
    med = lambda k, t, f: statistics.median(p[t][f] for p in points[k])
    records = []
    for t in turns:
        last = points["ours"][-1][t]
        config = {"preset": setup.preset, "sim_preset": setup.sim_preset, "dtype": args.dtype,
                  "sweep": "simulator", "turns": t, "horizon": horizon,
                  "batch": args.turns_batch // args.group_size * args.group_size,
                  "group_size": args.group_size, "turn_tokens": args.turn_tokens,
                  "sim_head_tokens": args.sim_head_tokens,
                  "sim_analyzer_tokens": args.sim_analyzer_tokens,
                  "sim_actor_tokens": args.sim_actor_tokens, "think": args.think}
        record = common.base_record("rollout", config, machine)
        ours_s, peer_s = med("ours", t, "simulator_s"), med("peer", t, "simulator_s")
        record.update(
            simulator_s=ours_s, turn_simulator_s=med("ours", t, "turn_s"),
            simulator_s_all=[p[t]["simulator_s"] for p in points["ours"]],
            full_turns_simulator_s=med("ours", t, "full_s"),
            peer_full_turns_simulator_s=med("peer", t, "full_s"),
            simulator_prefill_tokens=last["prefill"], simulator_reused_tokens=last["reused"],
            unique_prompt_tokens=last["unique"],
            prefill_over_unique=last["prefill"] / max(last["unique"], 1),
            compiles_after_warmup=max(p[t]["compiles"] for p in points["ours"]),
            first_s=sides["ours"][0], wall_s=statistics.median(times["ours"]),
            peer="noreuse", peer_simulator_s=peer_s,
            peer_turn_simulator_s=med("peer", t, "turn_s"),
            peer_simulator_prefill_tokens=points["peer"][-1][t]["prefill"],
            peer_compiles_after_warmup=max(p[t]["compiles"] for p in points["peer"]),
            peer_first_s=sides["peer"][0], peer_wall_s=statistics.median(times["peer"]),
            simulator_ratio=peer_s / max(ours_s, 1e-9))
        record.update(common.timing_fields(times))  # whole runs: ratio, per-round spread
        record["peak_rss_bytes"] = common.peak_rss_bytes()
        record["device_memory_bytes"] = common.device_memory_bytes()
        print(f"rollout {setup.preset} simulator T={t} B={config['batch']}: simulator "
              f"{ours_s:.2f}s (no reuse {peer_s:.2f}s), {t} whole turns "
              f"{record['full_turns_simulator_s']:.2f}s (no reuse "
              f"{record['peer_full_turns_simulator_s']:.2f}s), turn {t} alone "
              f"{record['turn_simulator_s']:.2f}s (no reuse "
              f"{record['peer_turn_simulator_s']:.2f}s), prefill {last['prefill']:.0f} tokens "
              f"(no reuse {record['peer_simulator_prefill_tokens']:.0f}), unique "
              f"{last['unique']}, prefill/unique {record['prefill_over_unique']:.2f}, "
              f"compiles after warm-up {record['compiles_after_warmup']} (no reuse "
              f"{record['peer_compiles_after_warmup']})", flush=True)
        records.append(record)
    # "simulator": T-turn dialogues (T analyses, T - 1 replies), the measure: with
    # every call costing the same it is ~1.29 over 1/2/4/8, not 1 (1, 3, 7, 15 calls).
    # "full_turns": T analyses and T replies, where equal calls give ~1.
    series = {"simulator": "simulator_s", "peer_simulator": "peer_simulator_s",
              "full_turns": "full_turns_simulator_s",
              "peer_full_turns": "peer_full_turns_simulator_s",
              "turn": "turn_simulator_s", "peer_turn": "peer_turn_simulator_s"}
    growth = {k: growth_exponent(turns, [r[f] for r in records]) for k, f in series.items()}
    for r in records:
        r["growth"] = growth
    print(f"rollout {setup.preset} simulator: growth exponent (time ~ turns^k): " + ", ".join(
        f"{k} {v:.2f}" for k, v in growth.items() if v is not None), flush=True)
    return records


def growth_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x (None with fewer than two points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


# ---------------------------------------------------------------------------- driver
_MEASURED = ("wall_s", "first_s", "compile_s", "policy_s", "analyzer_s", "actor_s", "other_s",
             "policy_tokens", "simulator_tokens", "tokens_per_s", "all_tokens_per_s",
             "dialogues_per_s", "dialogue_tokens_mean", "wall_s_all")
_MEASURED_PEER = ("tokens_per_s", "dialogues_per_s", "wall_s", "policy_s", "analyzer_s",
                  "actor_s", "compile_s")

def _record(setup: Setup, args, machine, sweep: str, turns: int, batch: int,
            ours: dict, peer: dict | None, timing: dict) -> dict:
    config = {"preset": setup.preset, "sim_preset": setup.sim_preset, "dtype": args.dtype,
              "sweep": sweep, "turns": turns, "batch": batch, "turn_tokens": args.turn_tokens,
              "sim_tokens": args.sim_tokens, "sim_prompt_tokens": args.sim_prompt_tokens,
              "think": args.think}
    record = common.base_record("rollout", config, machine)
    record.update(ours)
    record.update(peer=None, peer_tokens_per_s=None, ratio=None, peer_wall_s=None,
                  peer_policy_s=None, policy_ratio=None, peer_compile_s=None)
    if peer is not None:
        record.update(peer="reprefill", peer_tokens_per_s=peer["tokens_per_s"],
                      peer_dialogues_per_s=peer["dialogues_per_s"], peer_wall_s=peer["wall_s"],
                      peer_policy_s=peer["policy_s"], peer_analyzer_s=peer["analyzer_s"],
                      peer_actor_s=peer["actor_s"], peer_compile_s=peer["compile_s"],
                      policy_ratio=peer["policy_s"] / ours["policy_s"])
    record.update(timing)  # ratio (peer wall / ours, medians), its per-round min / max
    record["compilations"] = setup.policy_sampler.num_compilations + (
        0 if setup.sim_sampler is setup.policy_sampler else setup.sim_sampler.num_compilations)
    record["peak_rss_bytes"] = common.peak_rss_bytes()
    record["device_memory_bytes"] = common.device_memory_bytes()
    return record


def _print(record: dict) -> None:
    c = record["config"]
    peer = (f", peer {record['peer_wall_s']:.2f}s (policy {record['peer_policy_s']:.2f}s), "
            f"ratio {record['ratio']:.2f}x" if record["peer"] else "")
    print(f"rollout {c['preset']} {c['sweep']} T={c['turns']} B={c['batch']}: "
          f"{record['wall_s']:.2f}s = policy {record['policy_s']:.2f} + analyzer "
          f"{record['analyzer_s']:.2f} + actor {record['actor_s']:.2f} + other "
          f"{record['other_s']:.2f}; {record['dialogues_per_s']:.2f} dialogues/s, "
          f"{common.fmt_rate(record['tokens_per_s'])} policy tok/s, compile "
          f"{record['compile_s']:.1f}s{peer}", flush=True)


def run(args: argparse.Namespace) -> list[dict]:
    """Both sweeps for every preset; returns (and unless --no_save appends) the records."""
    machine = common.machine_info()
    records: list[dict] = []
    for preset in args.preset:
        setup = Setup(preset, args)
        if args.simulator_shape:
            records += run_simulator_sweep(setup, args, machine)
            continue
        with_peer = args.peer == "reprefill"
        sweep = []
        for turns in sorted(args.turns):
            ours, peer, timing = measure(setup, turns, args.turns_batch, args.turn_tokens,
                                         args.repeats, with_peer, args.think)
            record = _record(setup, args, machine, "turns", turns, args.turns_batch, ours,
                             peer, timing)
            _print(record)
            sweep.append(record)
        turns_list = [r["config"]["turns"] for r in sweep]
        growth = {
            "wall": growth_exponent(turns_list, [r["wall_s"] for r in sweep]),
            "policy": growth_exponent(turns_list, [r["policy_s"] for r in sweep]),
            "simulator": growth_exponent(turns_list, [r["analyzer_s"] + r["actor_s"]
                                                      for r in sweep]),
        }
        if with_peer:
            growth["peer_wall"] = growth_exponent(turns_list, [r["peer_wall_s"] for r in sweep])
            growth["peer_policy"] = growth_exponent(turns_list,
                                                    [r["peer_policy_s"] for r in sweep])
        for r in sweep:
            r["growth"] = growth
        print(f"rollout {preset}: growth exponent (time ~ turns^k): " + ", ".join(
            f"{k} {v:.2f}" for k, v in growth.items() if v is not None), flush=True)
        records += sweep

        for batch in sorted(args.batch):
            reuse = next((r for r in sweep if r["config"]["turns"] == args.batch_turns
                          and batch == args.turns_batch), None)
            peer_here = with_peer and args.peer_batch_sweep
            if reuse is not None:
                # Measured in the turns sweep already: same turns, same batch.
                ours = {k: reuse[k] for k in _MEASURED}
                peer = ({k: reuse["peer_" + k] for k in _MEASURED_PEER}
                        if peer_here and reuse["peer"] else None)
                timing = {"timing": {k: v for k, v in reuse["timing"].items()
                                     if k == "ours" or peer is not None}}
                if peer is not None:
                    timing.update({k: reuse[k] for k in ("ratio", "ratio_min", "ratio_max",
                                                         "ratio_per_round")})
            else:
                ours, peer, timing = measure(setup, args.batch_turns, batch, args.turn_tokens,
                                             args.repeats, peer_here, args.think)
            record = _record(setup, args, machine, "batch", args.batch_turns, batch, ours,
                             peer, timing)
            _print(record)
            records.append(record)
    if not args.no_save:
        path = common.append_results("rollout", records, args.results_dir)
        print(f"results appended to {path}")
    if not args.no_plots and not args.simulator_shape:
        for path in plot(records, args.results_dir or common.RESULTS_DIR):
            print(f"plot written: {path}")
    return records


# ----------------------------------------------------------------------------- plots
def plot(records: list[dict], out_dir: str) -> list[str]:
    """rollout_turns.png and rollout_batch.png from this run's records."""
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    presets = sorted({r["config"]["preset"] for r in records})
    device = records[0]["machine"].get("device_kind", "?") if records else "?"

    turns = [r for r in records if r["config"]["sweep"] == "turns"]
    if turns:
        fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4.5),
                                 squeeze=False)
        for ax, preset in zip(axes[0], presets):
            rows = sorted((r for r in turns if r["config"]["preset"] == preset),
                          key=lambda r: r["config"]["turns"])
            x = [r["config"]["turns"] for r in rows]
            g = rows[0]["growth"]
            ax.plot(x, [r["wall_s"] for r in rows], "o-", color="C0",
                    label=f"ours: total (k={g['wall']:.2f})")
            ax.plot(x, [r["policy_s"] for r in rows], "s--", color="C0", alpha=0.7,
                    label=f"ours: policy (k={g['policy']:.2f})")
            ax.plot(x, [r["analyzer_s"] + r["actor_s"] for r in rows], "^:", color="C2",
                    label=f"simulator (k={g['simulator']:.2f})")
            if rows[0]["peer"]:
                ax.plot(x, [r["peer_wall_s"] for r in rows], "o-", color="C3",
                        label=f"re-prefill: total (k={g['peer_wall']:.2f})")
                ax.plot(x, [r["peer_policy_s"] for r in rows], "s--", color="C3", alpha=0.7,
                        label=f"re-prefill: policy (k={g['peer_policy']:.2f})")
            ax.plot(x, [rows[0]["wall_s"] * t / x[0] for t in x], color="gray", lw=0.8,
                    alpha=0.6, label="linear reference")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(x, [str(t) for t in x])
            ax.set_xlabel("turns per dialogue")
            ax.set_ylabel("seconds per rollout (warm)")
            ax.set_title(f"{preset}, {rows[0]['config']['batch']} dialogues ({device})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, "rollout_turns.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    batch = [r for r in records if r["config"]["sweep"] == "batch"]
    if batch:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for i, preset in enumerate(presets):
            rows = sorted((r for r in batch if r["config"]["preset"] == preset),
                          key=lambda r: r["config"]["batch"])
            x = [r["config"]["batch"] for r in rows]
            axes[0].plot(x, [r["dialogues_per_s"] for r in rows], "o-", color=f"C{i}",
                         label=preset)
            axes[1].plot(x, [r["tokens_per_s"] for r in rows], "o-", color=f"C{i}",
                         label=f"{preset}: policy")
            axes[1].plot(x, [r["all_tokens_per_s"] for r in rows], "s--", color=f"C{i}",
                         alpha=0.7, label=f"{preset}: policy + simulator")
        turns_per = batch[0]["config"]["turns"]
        axes[0].set_ylabel("dialogues / s")
        axes[1].set_ylabel("sampled tokens / s")
        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("dialogues per batch")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"Rollout throughput vs batch ({turns_per} turns, {device})")
        fig.tight_layout()
        path = os.path.join(out_dir, "rollout_batch.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
