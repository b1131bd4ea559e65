"""Sentient-benchmark-style evaluation of a policy against a simulated user.

    python -m rlver_jax.evaluate (--workdir DIR [--step N] | --hf_model DIR|HUB_ID)
        --profiles FILE --out DIR [--quiet] [--config FILE] [--config.key=value ...]

Every knob is a key of the config (`configs/eval.py` by default), set as in training:
`--config.simulator.hf_dir=DIR|HUB_ID`, `--config.rollout.think=false`,
`--config.max_dialogues=N`, `--config.batch_size=N`, `--config.simulator.difficulty=hard`,
`--config.simulator.overrides.start_emotion=30`, `--config.mesh.shape='(1,-1,1)'`, ...

The protocol (SAGE / Sentient, `simulator.difficulty=sage`, the default): every dialogue
starts at emotion 40 with the profile's fixed `first_talk`, each judged change is clamped to
+-10, and a dialogue ends after 10 policy replies, below 10 or at 100. score = mean final
emotion, success = dialogues ending at 100, failure = dialogues ending below 10.

Writes into --out: `report.json` (the numbers), `dialogues.jsonl` (one audit record per
dialogue: every turn, emotion before / after, the simulator's analysis), and PNG plots
(`emotion_trajectories.png`, `score_distribution.png`, `need_breakdown.png`,
`personality_breakdown.png`); prints a summary table. The `rule` simulator is a TOY lexicon
judge: its numbers show that the machinery runs, they are not a benchmark score.

`evaluate_policy` is the library entry point (the trainer can reuse it).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable, Sequence

from rlver_jax import build, config_files, distributed
from rlver_jax.env import simulator as sim
from rlver_jax.env.profiles import SHIPPED
from rlver_jax.env.dialogue_log import dialogue_record
from rlver_jax.env.rollout import DialogueRollout, RolloutSettings
from rlver_jax.env.users import mix_seed
from rlver_jax.eval_load import build_user, load_policy, load_tokenizer, model_dir, \
    resolve_profiles
from rlver_jax.eval_report import TOY_WARNING, EvaluateError, Report, build_report, \
    format_summary, write_outputs

__all__ = ["TOY_WARNING", "EvaluateError", "Report", "evaluate_policy", "format_summary",
           "main", "run", "write_outputs"]


def _mask_runs(mask: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of 1s."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _turn_token_counts(samples, think: bool, stop_ids: set[int]) -> list[int]:
    """Generated content tokens (the end-of-turn token not counted) of each policy reply of
    one dialogue, in order. No-think: one sample, one run of loss-mask 1s per reply (the
    assistant header between replies is 0); think: one sample per reply."""
    counts = []
    for s in sorted(samples, key=lambda s: s.turn) if think else samples:
        for a, b in _mask_runs(s.loss_mask):
            counts.append(sum(1 for t in s.tokens[a:b] if t not in stop_ids))
    return counts


# Prompt tokens computed vs served from a KV cache, and simulator prompt truncations.
CACHE_COUNTS = ("policy_prefill_tokens", "policy_reused_tokens", "simulator_prefill_tokens",
                "simulator_reused_tokens", "simulator_truncations")


# ------------------------------------------------------------------------ evaluation
def evaluate_policy(policy_model, tokenizer, user, profiles: Sequence[Any],
                    settings: sim.SimulatorSettings, rollout_settings: RolloutSettings,
                    sampler, seed: int = 0, *, batch_size: int = 0,
                    id_prefix: str = "eval",
                    progress: Callable[[str], None] | None = None) -> Report:
    """Plays one dialogue per profile (no groups) and aggregates them into a `Report`.

    `user` is a `RuleUser` or `LLMUser` built with `settings`; `sampler` is a `Sampler` of
    the policy's architecture. Dialogues run `batch_size` at a time (0: all at once); the
    batch only changes how many rows share one generation, not the protocol. The report's
    `policy` and `profiles` fields are left for the caller to fill.

    Multi-host (a sampler whose mesh spans processes): every process passes its own share
    of the profiles and gets the report over all of them.
    """
    multiprocess = getattr(sampler, "multiprocess", False)
    if not profiles and not multiprocess:
        raise EvaluateError("no profiles to evaluate")
    rs = dataclasses.replace(rollout_settings, group_size=1)
    rollout = DialogueRollout(tokenizer, user, settings, rs, sampler)
    batch = max(batch_size if batch_size and batch_size > 0 else len(profiles), 1)
    stop_ids = set(tokenizer.eos_ids)
    stats: collections.Counter = collections.Counter()
    timing = collections.Counter()
    records: list[dict[str, Any]] = []
    chunks = math.ceil(len(profiles) / batch)
    if multiprocess:  # every process runs as many (possibly empty) rollouts as the busiest
        chunks = distributed.max_over_processes(chunks)
    t_start = time.perf_counter()
    for k in range(chunks):
        chunk = list(profiles[k * batch:(k + 1) * batch])
        t0 = time.perf_counter()
        result = rollout.run(policy_model, chunk, seed=mix_seed(seed, k), id_prefix=f"{id_prefix}{k}")
        for key, value in result.metrics.items():
            if key.startswith("rollout/"):
                stats[key.split("/", 1)[1]] += value
        timing.update(result.timing)
        by_dialogue: dict[str, list] = collections.defaultdict(list)
        for s in result.samples:
            by_dialogue[s.dialogue_id].append(s)
        for j, st in enumerate(result.dialogues):
            record = dialogue_record(st)
            record["index"] = k * batch + j
            counts = _turn_token_counts(by_dialogue[st.dialogue_id], rs.think, stop_ids)
            # A mismatch would mean the rollout's token layout changed; leave the counts
            # out rather than attribute them to the wrong replies.
            aligned = len(counts) == len(record["dialogue"])
            for turn, count in zip(record["dialogue"], counts if aligned else
                                   [None] * len(record["dialogue"])):
                turn["tokens"] = count
            record["policy_tokens"] = sum(counts)
            records.append(record)
        if progress is not None:
            done = min((k + 1) * batch, len(profiles))
            mean = sum(r["final_emotion"] for r in records) / max(len(records), 1)
            progress(f"batch {k + 1}/{chunks}: {done}/{len(profiles)} dialogues, "
                     f"running score {mean:.1f}, {time.perf_counter() - t0:.1f} s")
    total_s = time.perf_counter() - t_start
    # The rollout's stats hold the token accounting (summed over processes below).
    sim_calls = int(stats.get("simulator_calls", 0))  # this process's: all make the same
    if multiprocess:
        parts = distributed.gather_objects((records, dict(stats)))
        records = [r for p in parts for r in p[0]]
        for i, r in enumerate(records):
            r["index"] = i
        stats = collections.Counter()
        for p in parts:
            stats.update(p[1])
    sim_tokens = int(stats.get("simulator_tokens", 0))
    policy_tokens = sum(r["policy_tokens"] for r in records)
    policy_s = timing.get("policy_s", 0.0)
    timing_out = {
        "total_s": total_s, "policy_s": policy_s,
        "analyzer_s": timing.get("analyzer_s", 0.0), "actor_s": timing.get("actor_s", 0.0),
        "policy_tokens": policy_tokens, "simulator_tokens": sim_tokens,
        "policy_tokens_per_s": policy_tokens / policy_s if policy_s > 0 else 0.0,
        "tokens_per_s": (policy_tokens + sim_tokens) / total_s if total_s > 0 else 0.0,
        "batches": chunks,
        **{key: int(stats.get(key, 0)) for key in CACHE_COUNTS},
    }
    simulator = {"kind": getattr(user, "name", type(user).__name__),
                 "toy": getattr(user, "name", "") == "rule",
                 "warning": TOY_WARNING if getattr(user, "name", "") == "rule" else None,
                 "simulator_calls": sim_calls}
    settings_out = {"simulator": dataclasses.asdict(settings),
                    "rollout": dataclasses.asdict(rs), "seed": seed, "batch_size": batch,
                    "length_stops": int(stats.get("length_stops", 0))}
    return build_report(records, think=rs.think, stats=stats, simulator=simulator,
                        settings=settings_out, timing=timing_out)


# ------------------------------------------------------------------------------ CLI
DEFAULT_CONFIG = os.path.join(config_files.SHIPPED_DIR, "eval.py")
SIMULATOR_KINDS = ("auto", "rule", "llm")
# An HF model brings no training config: its reply budget. The default context cap is the
# model's max positions, at most this.
HF_MAX_TURN_TOKENS = 1024
MAX_DIALOGUE_TOKENS = 32768


def _define_flags(argv: Sequence[str]):
    """The flags of the command, on a private FlagValues: the trainer imports this module,
    and train.py's global --workdir / --config would clash with ours in absl's registry."""
    from absl import flags
    from ml_collections import config_flags
    fv = flags.FlagValues()
    d = dict(flag_values=fv)
    # config_flags reads the --config.* overrides in argv while the flag is defined.
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "ml-collections config file "
                                    "(default: configs/eval.py)", sys_argv=list(argv), **d)
    flags.DEFINE_string("workdir", None, "training workdir (holds checkpoints/)", **d)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", **d)
    flags.DEFINE_string("hf_model", None, "HF Qwen2 directory or hub id (ORG/NAME[@REV]) of the "
                        "policy", **d)
    flags.DEFINE_string("profiles", None, "profile jsonl (RLVER / SAGE schema) or a shipped "
                        f"set ({', '.join(sorted(SHIPPED))})", **d)
    flags.DEFINE_string("out", None, "output directory or gs:// URL (report.json, "
                        "dialogues.jsonl, PNGs)", **d)
    flags.DEFINE_bool("quiet", False, "no progress lines", **d)
    flags.mark_flags_as_required(["profiles", "out"], flag_values=fv)
    return fv


def _sim_settings(c) -> sim.SimulatorSettings:
    # Evaluation opens with the profile's fixed first message unless a knob says otherwise
    # (profiles without one get a generated opening), so every policy faces the same turn.
    first_talk = {} if c.simulator.overrides.use_first_talk is not None else {
        "use_first_talk": True}
    try:
        return build.simulator_settings(c, **first_talk)
    except build.ConfigError as e:
        raise EvaluateError(str(e)) from e


def _layout(c) -> build.Layout:
    """`config.mesh`'s layout; without a shape, no mesh (one device)."""
    if c.mesh.shape is None:
        return build.Layout(mesh=None, rules=None, sampling_rules=None)
    try:
        return build.build_layout(c)
    except (ValueError, KeyError, TypeError) as e:
        raise EvaluateError(f"config.mesh: {e}") from e


def run(fv, log: Callable[[str], None]) -> Report:
    """Everything the CLI does after flag parsing; raises EvaluateError for bad inputs."""
    import jax

    from rlver_jax import sharding as sharding_lib
    from rlver_jax import storage
    from rlver_jax.sampling import Sampler

    c = fv.config
    if not fv.workdir and not fv.hf_model:
        raise EvaluateError("pass --workdir DIR (training checkpoint) or --hf_model DIR")
    if fv.workdir and fv.hf_model:
        raise EvaluateError("pass only one of --workdir and --hf_model")
    if fv.workdir and not storage.path(fv.workdir).is_dir():
        raise EvaluateError(f"workdir not found: {fv.workdir}")
    if c.simulator.kind not in SIMULATOR_KINDS:
        raise EvaluateError(f"config.simulator.kind={c.simulator.kind!r}: expected one of "
                            f"{SIMULATOR_KINDS}")
    # Profiles first: a bad file should fail before minutes of model loading.
    profiles, profiles_desc = resolve_profiles(fv.profiles, c.max_dialogues)
    # Hub ids resolve (and download) next: a missing model fails before the other one loads.
    if fv.hf_model:
        model_dir(fv.hf_model, "--hf_model")
    sim_dir = c.simulator.hf_dir and model_dir(c.simulator.hf_dir, "config.simulator.hf_dir")
    kind = c.simulator.kind
    if kind == "auto":
        kind = "llm" if c.simulator.hf_dir or c.simulator.preset else "rule"
    if kind == "llm" and not (c.simulator.hf_dir or c.simulator.preset):
        raise EvaluateError("config.simulator.kind='llm' needs config.simulator.hf_dir (or "
                            "config.simulator.preset for a random-weight smoke test)")
    settings = _sim_settings(c)
    layout = _layout(c)
    context = contextlib.ExitStack()
    if layout.mesh is not None:
        context.enter_context(jax.set_mesh(layout.mesh))
        context.enter_context(sharding_lib.logical_rules(layout.rules))
    with context:
        t0 = time.perf_counter()
        policy = load_policy(fv.workdir, fv.step, fv.hf_model, c.tokenizer or None,
                             c.policy.dtype or None, layout.mesh, layout.rules)
        rollout_cfg = policy.train_config.get("rollout", {}) if policy.train_config else {}
        r = c.rollout
        think = r.think if r.think is not None else bool(rollout_cfg.get("think", False))
        max_turn_tokens = r.max_turn_tokens or int(rollout_cfg.get("max_turn_tokens",
                                                                   HF_MAX_TURN_TOKENS))
        max_dialogue_tokens = r.max_dialogue_tokens or min(
            int(policy.config.max_position_embeddings), MAX_DIALOGUE_TOKENS)
        if max_turn_tokens >= max_dialogue_tokens:
            raise EvaluateError(f"config.rollout.max_turn_tokens={max_turn_tokens} must be "
                                f"below the dialogue cap {max_dialogue_tokens}")
        rollout_settings = RolloutSettings(
            think=think, group_size=1, max_turn_tokens=max_turn_tokens,
            max_dialogue_tokens=max_dialogue_tokens, temperature=r.temperature,
            top_p=r.top_p, unclosed_think="pass")
        s = c.simulator
        sim_tok = None
        if kind == "llm":
            sim_tok_spec = s.tokenizer
            if not sim_tok_spec and sim_dir and os.path.isfile(
                    os.path.join(sim_dir, "tokenizer_config.json")):
                sim_tok_spec = s.hf_dir
            sim_tok = (load_tokenizer(sim_tok_spec, "simulator") if sim_tok_spec
                       else policy.tokenizer)
        user, sim_source = build_user(c, kind, settings, sim_tok, layout)
        load_s = time.perf_counter() - t0
        if kind == "rule":
            log("WARNING: " + TOY_WARNING)
        log(f"loaded policy ({policy.source['kind']}) and {kind} simulator in {load_s:.1f} s; "
            f"evaluating {len(profiles)} dialogues (think={think}, "
            f"difficulty={s.difficulty})")
        sampler = Sampler(policy.model, mesh=layout.mesh)
        report = evaluate_policy(policy.model, policy.tokenizer, user, profiles, settings,
                                 rollout_settings, sampler, c.seed, batch_size=c.batch_size,
                                 progress=None if fv.quiet else log)
    report.policy = policy.source
    report.profiles = {"source": profiles_desc, "spec": fv.profiles, "n": len(profiles)}
    report.simulator.update(sim_source)
    if kind == "llm":
        report.simulator["sampling"] = dataclasses.asdict(user.sampling)
        report.simulator["tokenizer"] = sim_tok.spec
    report.settings.update(difficulty=s.difficulty,
                           simulator_overrides=config_files.simulator_overrides(s.overrides),
                           max_dialogues=c.max_dialogues)
    report.timing["load_s"] = load_s
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 bad input, 2 usage error)."""
    from absl import flags

    from rlver_jax.cli_errors import config_error
    argv, missing = config_files.checked_config_argv(list(sys.argv if argv is None else argv))
    if missing is not None:
        print(missing, file=sys.stderr)
        return 2
    try:
        fv = _define_flags(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        print(config_error(e, argv), file=sys.stderr)
        return 2
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip().split("\n\n")[0] + "\n\n" + fv.get_help())
        return 0
    try:
        rest = fv(argv)
        if len(rest) > 1:
            raise flags.Error(f"unexpected arguments: {rest[1:]}")
    except flags.IllegalFlagValueError as e:
        print(config_error(e, argv), file=sys.stderr)
        return 2
    except flags.Error as e:
        print(f"usage error: {e}\n\n{fv.get_help()}", file=sys.stderr)
        return 2
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        report = run(fv, log)
        files = write_outputs(report, fv.out)
    except EvaluateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(report))
    print(f"wrote {', '.join(files)} to {fv.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
