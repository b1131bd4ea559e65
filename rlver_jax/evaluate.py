"""Sentient-benchmark-style evaluation of a policy against a simulated user.

    python -m rlver_jax.evaluate (--workdir DIR [--step N] | --hf_model DIR|HUB_ID)
        --profiles FILE --out DIR [--simulator rule|llm] [--simulator_hf_dir DIR|HUB_ID]
        [--simulator_preset NAME]
        [--tokenizer SPEC] [--think|--nothink] [--max_dialogues N] [--max_turn_tokens N]
        [--temperature T] [--seed S] [--difficulty sage|hard|strict] [--batch_size N]

The protocol (SAGE / Sentient, `--difficulty=sage`, the default): every dialogue starts at
emotion 40 with the profile's fixed `first_talk`, each judged change is clamped to +-10, and
a dialogue ends after 10 policy replies, below 10 or at 100. score = mean final emotion,
success = dialogues ending at 100, failure = dialogues ending below 10.

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
import json
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Sequence

from rlver_jax import distributed
from rlver_jax.env import simulator as sim
from rlver_jax.env.profiles import HIDDEN_NEEDS, OTHER_NEED, PERSONALITIES, SHIPPED, \
    ProfileError, load_profiles, profiles_path
from rlver_jax.env.rollout import DialogueRollout, RolloutSettings, dialogue_record
from rlver_jax.env.users import mix_seed

TOY_WARNING = ("TOY SIMULATOR: the 'rule' user is a lexicon judge with template replies, not "
               "an LLM; these numbers are NOT comparable to the paper's Sentient scores. Pass "
               "--simulator_hf_dir for a real evaluation.")

# Sentient benchmark numbers from the RLVER paper (100 SAGE test profiles, LLM simulator):
# name -> (score, success, failure); None where the paper gives no count.
PAPER_REFERENCE: dict[str, tuple[float, int | None, int | None]] = {
    "Qwen2.5-7B-Instruct": (13.3, 2, 76),
    "RLVER PPO + think": (79.2, 42, 9),
    "RLVER PPO no-think": (61.7, None, None),
    "RLVER GRPO + think": (72.0, None, None),
    "RLVER GRPO no-think": (68.3, None, None),
    "GPT-4o": (79.9, None, None),
    "Gemini 2.5 Pro": (82.4, None, None),
}



class EvaluateError(ValueError):
    """An input (workdir, model directory, profiles, flags) cannot be used; one line."""


# --------------------------------------------------------------------------- report
@dataclasses.dataclass
class Report:
    """The outcome of one evaluation. `to_dict()` is `report.json`; `records` (one
    `dialogue_record` per dialogue, plus `index` and per-turn `tokens`) is dialogues.jsonl."""

    score: float
    score_std: float
    reward_mean: float
    success: int
    failure: int
    n: int
    by_need: dict[str, dict[str, float]]
    by_personality: dict[str, dict[str, float]]
    think: bool
    think_format_violations: int
    truncated_turns: int               # replies cut at --max_turn_tokens (passed on as cut)
    replies: int
    turns_mean: float
    reply_tokens_mean: float
    reply_chars_mean: float
    reply_raw_chars_mean: float
    end_reasons: dict[str, int]
    simulator: dict[str, Any]
    settings: dict[str, Any]
    timing: dict[str, float]
    policy: dict[str, Any] = dataclasses.field(default_factory=dict)
    profiles: dict[str, Any] = dataclasses.field(default_factory=dict)
    records: list[dict[str, Any]] = dataclasses.field(default_factory=list, repr=False)

    @property
    def success_rate(self) -> float:
        return self.success / self.n if self.n else 0.0

    @property
    def failure_rate(self) -> float:
        return self.failure / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "records"}
        out["success_rate"] = self.success_rate
        out["failure_rate"] = self.failure_rate
        return json.loads(json.dumps(out, default=str))

    def metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat float metrics (for metrics.jsonl / TensorBoard during training)."""
        m = {"score": self.score, "success_frac": self.success_rate,
             "failure_frac": self.failure_rate, "turns_mean": self.turns_mean,
             "reply_tokens_mean": self.reply_tokens_mean,
             "think_format_violations": float(self.think_format_violations),
             "truncated_turns": float(self.truncated_turns),
             "parse_failures": float(self.simulator.get("parse_failures", 0))}
        return {prefix + k: float(v) for k, v in m.items()}


def _breakdown(records: Sequence[Mapping[str, Any]], key: str, order: Sequence[str]
               ) -> dict[str, dict[str, float]]:
    """Per category of `key`: n, mean final emotion, successes, failures. Categories in
    `order` first (the paper's order), then any others alphabetically; empty ones left out."""
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for r in records:
        groups[str(r.get(key))].append(float(r["final_emotion"]))
    names = [c for c in order if c in groups] + sorted(c for c in groups if c not in order)
    return {c: {"n": len(groups[c]),
                "mean_emotion": sum(groups[c]) / len(groups[c]),
                "success": sum(e >= sim.SUCCESS_EMOTION for e in groups[c]),
                "failure": sum(e < sim.FAILURE_EMOTION for e in groups[c])}
            for c in names}


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


def build_report(records: list[dict[str, Any]], *, think: bool, stats: Mapping[str, float],
                 simulator: Mapping[str, Any], settings: Mapping[str, Any],
                 timing: Mapping[str, float]) -> Report:
    """Aggregates dialogue records (as written to dialogues.jsonl) into a `Report`."""
    if not records:
        raise EvaluateError("no dialogues to report on")
    finals = [float(r["final_emotion"]) for r in records]
    n = len(finals)
    mean = sum(finals) / n
    turns = [t for r in records for t in r["dialogue"]]
    token_counts = [t["tokens"] for t in turns if t.get("tokens") is not None]
    end_reasons = collections.Counter(str(r["done_reason"]) for r in records)
    sim_info = dict(simulator)
    for key in ("parse_failures", "analyzer_fallbacks", "actor_fallbacks"):
        sim_info[key] = int(stats.get(key, 0))
    return Report(
        score=mean,
        score_std=math.sqrt(sum((f - mean) ** 2 for f in finals) / n),
        reward_mean=sum(sim.reward(f) for f in finals) / n,
        success=sum(f >= sim.SUCCESS_EMOTION for f in finals),
        failure=sum(f < sim.FAILURE_EMOTION for f in finals),
        n=n,
        by_need=_breakdown(records, "need", (*HIDDEN_NEEDS, OTHER_NEED)),
        by_personality=_breakdown(records, "personality", PERSONALITIES),
        think=think,
        think_format_violations=int(stats.get("format_violations", 0)),
        truncated_turns=int(stats.get("truncated_turns", 0)),
        replies=len(turns),
        turns_mean=sum(int(r["turns"]) for r in records) / n,
        reply_tokens_mean=(sum(token_counts) / len(token_counts)) if token_counts else 0.0,
        reply_chars_mean=(sum(len(t["policy_reply"] or "") for t in turns) / len(turns)
                          if turns else 0.0),
        reply_raw_chars_mean=(sum(len(t["policy_raw"] or "") for t in turns) / len(turns)
                              if turns else 0.0),
        end_reasons=dict(sorted(end_reasons.items())),
        simulator=sim_info,
        settings=dict(settings),
        timing=dict(timing),
        records=records,
    )


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


# --------------------------------------------------------------------------- outputs
def write_outputs(report: Report, out_dir: str | os.PathLike) -> list[str]:
    """Writes report.json, dialogues.jsonl and the plots; returns the file names."""
    from rlver_jax import plots

    from rlver_jax import storage

    storage.makedirs(out_dir)
    path = lambda name: storage.join(out_dir, name)  # noqa: E731
    storage.write_text(path("report.json"),
                       json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    storage.write_text(path("dialogues.jsonl"), "".join(
        json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in report.records))
    toy = " [TOY rule simulator]" if report.simulator.get("toy") else ""
    plots.plot_emotion_trajectories(report.records, path("emotion_trajectories.png"),
                                    title=f"Emotion per turn (n={report.n}){toy}")
    plots.plot_score_distribution([r["final_emotion"] for r in report.records],
                                  path("score_distribution.png"),
                                  title=f"Final emotion: score {report.score:.1f}{toy}")
    plots.plot_breakdown(report.by_need, path("need_breakdown.png"),
                         title=f"Final emotion by hidden need{toy}")
    plots.plot_breakdown(report.by_personality, path("personality_breakdown.png"),
                         title=f"Final emotion by personality{toy}")
    return ["report.json", "dialogues.jsonl", "emotion_trajectories.png",
            "score_distribution.png", "need_breakdown.png", "personality_breakdown.png"]


def format_summary(report: Report) -> str:
    """A plain-text table of the report for the terminal."""
    lines = []
    bar = "!" * 78
    if report.simulator.get("toy"):
        lines += [bar, *_wrap("!! " + TOY_WARNING, 78), bar]
    src = report.policy
    who = (f"workdir {src.get('workdir')} step {src.get('step')}" if src.get("kind") == "workdir"
           else f"HF model {src.get('hf_model')}")
    lines.append(f"policy: {who} | think={report.think} | simulator: "
                 f"{report.simulator.get('kind')}{' (TOY)' if report.simulator.get('toy') else ''}"
                 f" | profiles: {report.profiles.get('source', '?')} ({report.n})")
    lines.append(f"{'score':>10} {'success':>10} {'failure':>10} {'turns':>8} "
                 f"{'reply tok':>10} {'reply chr':>10}")
    lines.append(f"{report.score:>10.1f} {f'{report.success}/{report.n}':>10} "
                 f"{f'{report.failure}/{report.n}':>10} {report.turns_mean:>8.2f} "
                 f"{report.reply_tokens_mean:>10.1f} {report.reply_chars_mean:>10.1f}")
    for title, table in (("hidden need", report.by_need),
                         ("personality", report.by_personality)):
        lines.append("")
        lines.append(f"{'by ' + title:<40} {'n':>4} {'mean':>7} {'succ':>5} {'fail':>5}")
        for name, row in table.items():
            lines.append(f"{name[:40]:<40} {row['n']:>4} {row['mean_emotion']:>7.1f} "
                         f"{row['success']:>5} {row['failure']:>5}")
    lines.append("")
    lines.append("end reasons: " + ", ".join(f"{k} {v}" for k, v in report.end_reasons.items()))
    s = report.simulator
    lines.append(f"simulator parse failures: {s.get('parse_failures', 0)} (analyzer fallbacks "
                 f"{s.get('analyzer_fallbacks', 0)}, actor fallbacks "
                 f"{s.get('actor_fallbacks', 0)})")
    lines.append(f"truncated replies (cut at the turn token limit): {report.truncated_turns} "
                 f"of {report.replies}")
    if report.think:
        lines.append(f"think-format violations (unclosed <think>): "
                     f"{report.think_format_violations} of {report.replies} replies")
    t = report.timing
    lines.append(f"time {t.get('total_s', 0):.1f} s (policy {t.get('policy_s', 0):.1f} s, "
                 f"simulator {t.get('analyzer_s', 0) + t.get('actor_s', 0):.1f} s); policy "
                 f"{t.get('policy_tokens_per_s', 0):.1f} tok/s; all {t.get('tokens_per_s', 0):.1f}"
                 " tok/s")
    ref = "; ".join(f"{name} {sc:.1f}" + (f" ({su}/{fa})" if su is not None else "")
                    for name, (sc, su, fa) in PAPER_REFERENCE.items())
    lines.append(f"paper (100 SAGE profiles, LLM simulator; score (success/failure)): {ref}")
    if report.simulator.get("toy"):
        lines += [bar, *_wrap("!! " + TOY_WARNING, 78), bar]
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap
    return textwrap.wrap(text, width, subsequent_indent="!! ")


# ------------------------------------------------------------------- CLI components
def resolve_profiles(spec: str, max_dialogues: int = 0) -> tuple[list, str]:
    """A shipped set name or a jsonl path -> (profiles, description). Errors name the file
    (and the line, for a bad record)."""
    try:
        path = profiles_path(spec)
        profiles = load_profiles(path)
    except FileNotFoundError as e:
        raise EvaluateError(str(e)) from e
    except ProfileError as e:
        raise EvaluateError(f"bad profiles file: {e}") from e
    except OSError as e:
        raise EvaluateError(f"cannot read profiles file {path}: {e}") from e
    total = len(profiles)
    if max_dialogues and max_dialogues > 0:
        profiles = profiles[:max_dialogues]
    name = spec if spec in SHIPPED else path
    return profiles, f"{name}: {len(profiles)} of {total}"


def _hf_dtype(hf_dir: str) -> str:
    """The dtype an HF directory was saved in (config.json), float32 when it does not say."""
    try:
        with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, ValueError):
        return "float32"
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return dtype if dtype in ("float32", "bfloat16", "float16") else "float32"


def _model_dir(spec: str, what: str) -> str:
    """A local directory for `spec`: itself, or a hub id resolved through the HF cache."""
    from rlver_jax.model_source import ModelSourceError, resolve_model_dir
    try:
        return resolve_model_dir(spec, what=what)
    except ModelSourceError as e:
        raise EvaluateError(str(e)) from e


def _load_hf_model(hf_dir: str, dtype: str, mesh, rules, what: str):
    from rlver_jax.models import CheckpointFormatError, load_hf
    hf_dir = _model_dir(hf_dir, what)
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise EvaluateError(f"{what} directory {hf_dir} has no config.json")
    try:
        return load_hf(hf_dir, dtype or _hf_dtype(hf_dir), mesh, rules)
    except (CheckpointFormatError, FileNotFoundError, KeyError, ValueError) as e:
        raise EvaluateError(f"cannot load {what} from {hf_dir}: {e}") from e


def _load_tokenizer(spec: str, what: str):
    from rlver_jax.tokenizer import load_chat_tokenizer
    try:
        return load_chat_tokenizer(spec)
    except (FileNotFoundError, ValueError) as e:
        raise EvaluateError(f"cannot load the {what} tokenizer {spec!r}: {e}; pass "
                            "--tokenizer") from e


@dataclasses.dataclass
class LoadedPolicy:
    model: Any
    config: Any
    tokenizer: Any
    source: dict[str, Any]
    train_config: dict[str, Any]


def load_policy(workdir: str | None, step: int | None, hf_model: str | None,
                tokenizer: str | None, dtype: str | None, mesh=None, rules=None
                ) -> LoadedPolicy:
    """The policy (and its tokenizer) from a training workdir or an HF directory."""
    if bool(workdir) == bool(hf_model):
        raise EvaluateError("pass exactly one of --workdir and --hf_model")
    if workdir:
        from rlver_jax.export import ExportError, load_policy_from_workdir
        try:
            config, model, meta = load_policy_from_workdir(workdir, step, mesh=mesh, rules=rules)
        except ExportError as e:
            raise EvaluateError(str(e)) from e
        if dtype and dtype != config.param_dtype:
            import jax
            from flax import nnx
            graphdef, state = nnx.split(model)
            state = jax.tree.map(lambda x: x.astype(dtype), state)
            model = nnx.merge(graphdef, state)
            config = config.replace(param_dtype=dtype, dtype=dtype)
        spec = tokenizer or meta.get("tokenizer")
        if not spec:
            raise EvaluateError(f"the checkpoint in {workdir} names no tokenizer; pass "
                                "--tokenizer")
        tok = _load_tokenizer(spec, "policy")
        train_config = meta.get("config") or {}
        source = {"kind": "workdir", "workdir": os.fspath(workdir),
                  "step": int(meta.get("step", step if step is not None else -1)),
                  "tokenizer": tok.spec, "dtype": config.param_dtype}
        return LoadedPolicy(model, config, tok, source, train_config)
    config, model = _load_hf_model(hf_model, dtype, mesh, rules, "HF model")
    tok = _load_tokenizer(tokenizer or hf_model, "policy")
    source = {"kind": "hf", "hf_model": os.fspath(hf_model), "tokenizer": tok.spec,
              "dtype": config.param_dtype}
    return LoadedPolicy(model, config, tok, source, {})


def _random_model_host(config, seed: int):
    """A random-weight Qwen2 filled from numpy (norm scales 1, the rest N(0, 0.02)).

    For smoke-test simulators only: `create_model`'s jitted initialiser compiles for tens
    of seconds on a small CPU, which would dominate a two-dialogue run.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from rlver_jax.models import Qwen2
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        if "norm" in jax.tree_util.keystr(path):
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(rng.normal(0.0, 0.02, x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def build_user(kind: str, settings: sim.SimulatorSettings, *, hf_dir: str | None,
               preset: str | None, tokenizer, dtype: str | None, seed: int, sampling,
               mesh=None, rules=None):
    """A `RuleUser` (TOY) or an `LLMUser` from an HF directory or a random-weight preset."""
    from rlver_jax.env.users import LLMUser, RuleUser
    if kind == "rule":
        return RuleUser(settings), {"kind": "rule"}
    from rlver_jax.sampling import Sampler
    if hf_dir:
        _, model = _load_hf_model(hf_dir, dtype, mesh, rules, "simulator model")
        source = {"kind": "llm", "hf_dir": hf_dir}
    elif preset:
        from rlver_jax.models import PRESETS, create_model, get_preset
        if preset not in PRESETS:
            raise EvaluateError(f"--simulator_preset={preset!r}: not one of {sorted(PRESETS)}")
        cfg = get_preset(preset)
        if cfg.vocab_size < tokenizer.vocab_size:
            raise EvaluateError(f"--simulator_preset={preset!r} has a vocabulary of "
                                f"{cfg.vocab_size}, smaller than the tokenizer's "
                                f"{tokenizer.vocab_size}")
        dtype = dtype or "float32"
        cfg = cfg.replace(param_dtype=dtype, dtype=dtype, eos_token_id=tokenizer.im_end_id,
                          bos_token_id=None)
        model = (_random_model_host(cfg, seed + 1) if mesh is None
                 else create_model(cfg, seed + 1, mesh=mesh, rules=rules))
        source = {"kind": "llm", "preset": preset, "random_weights": True}
    else:
        raise EvaluateError("--simulator=llm needs --simulator_hf_dir (or --simulator_preset "
                            "for a random-weight smoke test)")
    user = LLMUser(settings, model, tokenizer, Sampler(model, mesh=mesh), sampling)
    return user, source


# ------------------------------------------------------------------------------ CLI
def _define_flags():
    # A private FlagValues: the trainer imports this module, and train.py's global
    # --workdir would clash with ours in absl's global registry.
    from absl import flags
    fv = flags.FlagValues()
    d = dict(flag_values=fv)
    flags.DEFINE_string("workdir", None, "training workdir (holds checkpoints/)", **d)
    flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)", **d)
    flags.DEFINE_string("hf_model", None, "HF Qwen2 directory or hub id (ORG/NAME[@REV]) of the "
                        "policy", **d)
    flags.DEFINE_string("profiles", None, "profile jsonl (RLVER / SAGE schema) or a shipped "
                        f"set ({', '.join(sorted(SHIPPED))})", **d)
    flags.DEFINE_string("out", None, "output directory or gs:// URL (report.json, "
                        "dialogues.jsonl, PNGs)",
                        **d)
    flags.DEFINE_enum("simulator", None, ["rule", "llm"], "simulated user (default: llm when "
                      "--simulator_hf_dir or --simulator_preset is given, else the TOY rule "
                      "judge)", **d)
    flags.DEFINE_string("simulator_hf_dir", None, "HF directory or hub id of the simulator LLM",
                        **d)
    flags.DEFINE_string("simulator_preset", None, "random-weight simulator of this preset "
                        "(smoke tests only)", **d)
    flags.DEFINE_string("simulator_tokenizer", None, "simulator tokenizer spec (default: the "
                        "simulator HF dir when it holds one, else the policy tokenizer)", **d)
    flags.DEFINE_string("simulator_dtype", None, "simulator weight dtype (default: as saved)",
                        **d)
    flags.DEFINE_float("simulator_temperature", 0.7, "simulator sampling temperature", **d)
    flags.DEFINE_float("simulator_top_p", 0.95, "simulator top-p", **d)
    flags.DEFINE_integer("simulator_max_analyzer_tokens", 512, "analyzer tokens per call", **d)
    flags.DEFINE_integer("simulator_max_actor_tokens", 384, "actor tokens per call", **d)
    flags.DEFINE_integer("simulator_max_prompt_tokens", 8192, "simulator prompt cap", **d)
    flags.DEFINE_bool("simulator_reuse_cache", True, "keep the simulator's KV cache per "
                      "dialogue across turns (false: re-prefill every prompt)", **d)
    flags.DEFINE_string("tokenizer", None, "policy tokenizer spec (default: the checkpoint's, "
                        "or the HF model dir)", **d)
    flags.DEFINE_string("dtype", None, "policy weight dtype (default: as trained / saved)", **d)
    flags.DEFINE_bool("think", None, "think mode (default: the training config's, else false)",
                      **d)
    flags.DEFINE_integer("max_dialogues", 0, "evaluate the first N profiles (0: all)", **d)
    flags.DEFINE_integer("max_turn_tokens", None, "policy tokens per reply (default: the "
                         "training config's, else 1024)", **d)
    flags.DEFINE_integer("max_dialogue_tokens", None, "policy context cap (default: the "
                         "model's max positions, at most 32768)", **d)
    flags.DEFINE_float("temperature", 0.0, "policy temperature (0: greedy)", **d)
    flags.DEFINE_float("top_p", 1.0, "policy top-p", **d)
    flags.DEFINE_integer("seed", 0, "seed of sampling and simulator", **d)
    flags.DEFINE_enum("difficulty", "sage", sorted(sim.DIFFICULTY_PRESETS),
                      "simulator preset (sage: start 40, clamp 10, 10 turns, fixed first_talk)",
                      **d)
    flags.DEFINE_multi_string("simulator_override", [], "KEY=VALUE overriding one "
                              "SimulatorSettings field, e.g. start_emotion=30 (repeatable)", **d)
    flags.DEFINE_integer("batch_size", 0, "dialogues per batched rollout (0: all at once)", **d)
    flags.DEFINE_string("mesh", "", "load sharded on a (data,fsdp,tensor) mesh, e.g. '1,-1,1' "
                        "(default: one device)", **d)
    flags.DEFINE_bool("quiet", False, "no progress lines", **d)
    flags.mark_flags_as_required(["profiles", "out"], flag_values=fv)
    return fv


def _parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise EvaluateError(f"--simulator_override={item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _sim_settings(difficulty: str, overrides: Mapping[str, Any]) -> sim.SimulatorSettings:
    # Evaluation always opens with the profile's fixed first message (profiles without one
    # get a generated opening) so that every policy faces the same first turn.
    try:
        return sim.settings_from_config({"preset": difficulty, "use_first_talk": True,
                                         **overrides})
    except ValueError as e:
        raise EvaluateError(f"simulator settings: {e}") from e


def run(fv, log: Callable[[str], None]) -> Report:
    """Everything the CLI does after flag parsing; raises EvaluateError for bad inputs."""
    import jax

    from rlver_jax import sharding as sharding_lib
    from rlver_jax.env.users import SimulatorSampling
    from rlver_jax.sampling import Sampler

    if not fv.workdir and not fv.hf_model:
        raise EvaluateError("pass --workdir DIR (training checkpoint) or --hf_model DIR")
    if fv.workdir and fv.hf_model:
        raise EvaluateError("pass only one of --workdir and --hf_model")
    from rlver_jax import storage
    if fv.workdir and not storage.path(fv.workdir).is_dir():
        raise EvaluateError(f"workdir not found: {fv.workdir}")
    # Profiles first: a bad file should fail before minutes of model loading.
    profiles, profiles_desc = resolve_profiles(fv.profiles, fv.max_dialogues)
    # Hub ids resolve (and download) next: a missing model fails before the other one loads.
    if fv.hf_model:
        _model_dir(fv.hf_model, "--hf_model")
    sim_dir = fv.simulator_hf_dir and _model_dir(fv.simulator_hf_dir, "--simulator_hf_dir")
    kind = fv.simulator or ("llm" if fv.simulator_hf_dir or fv.simulator_preset else "rule")
    if kind == "llm" and not (fv.simulator_hf_dir or fv.simulator_preset):
        raise EvaluateError("--simulator=llm needs --simulator_hf_dir (or --simulator_preset "
                            "for a random-weight smoke test)")
    settings = _sim_settings(fv.difficulty, _parse_overrides(fv.simulator_override))

    mesh = rules = None
    if fv.mesh:
        try:
            mesh = sharding_lib.make_mesh([int(s) for s in fv.mesh.split(",")])
        except (ValueError, KeyError) as e:
            raise EvaluateError(f"--mesh={fv.mesh!r}: {e}") from e
        rules = sharding_lib.FSDP_TENSOR_RULES
    context = contextlib.ExitStack()
    if mesh is not None:
        context.enter_context(jax.set_mesh(mesh))
        context.enter_context(sharding_lib.logical_rules(rules))
    with context:
        t0 = time.perf_counter()
        policy = load_policy(fv.workdir, fv.step, fv.hf_model, fv.tokenizer, fv.dtype, mesh,
                             rules)
        rollout_cfg = policy.train_config.get("rollout", {}) if policy.train_config else {}
        think = fv.think if fv.think is not None else bool(rollout_cfg.get("think", False))
        max_turn_tokens = fv.max_turn_tokens or int(rollout_cfg.get("max_turn_tokens", 1024))
        max_dialogue_tokens = fv.max_dialogue_tokens or min(
            int(policy.config.max_position_embeddings), 32768)
        if max_turn_tokens >= max_dialogue_tokens:
            raise EvaluateError(f"--max_turn_tokens={max_turn_tokens} must be below the "
                                f"dialogue cap {max_dialogue_tokens}")
        rollout_settings = RolloutSettings(
            think=think, group_size=1, max_turn_tokens=max_turn_tokens,
            max_dialogue_tokens=max_dialogue_tokens, temperature=fv.temperature,
            top_p=fv.top_p, unclosed_think="pass")
        if kind == "llm":
            sim_tok_spec = fv.simulator_tokenizer
            if not sim_tok_spec and sim_dir and os.path.isfile(
                    os.path.join(sim_dir, "tokenizer_config.json")):
                sim_tok_spec = fv.simulator_hf_dir
            sim_tok = (_load_tokenizer(sim_tok_spec, "simulator") if sim_tok_spec
                       else policy.tokenizer)
        else:
            sim_tok = None
        sampling = SimulatorSampling(
            temperature=fv.simulator_temperature, top_p=fv.simulator_top_p,
            max_analyzer_tokens=fv.simulator_max_analyzer_tokens,
            max_actor_tokens=fv.simulator_max_actor_tokens,
            max_prompt_tokens=fv.simulator_max_prompt_tokens,
            reuse_cache=fv.simulator_reuse_cache)
        user, sim_source = build_user(kind, settings, hf_dir=fv.simulator_hf_dir,
                                      preset=fv.simulator_preset, tokenizer=sim_tok,
                                      dtype=fv.simulator_dtype, seed=fv.seed,
                                      sampling=sampling, mesh=mesh, rules=rules)
        load_s = time.perf_counter() - t0
        if kind == "rule":
            log("WARNING: " + TOY_WARNING)
        log(f"loaded policy ({policy.source['kind']}) and {kind} simulator in {load_s:.1f} s; "
            f"evaluating {len(profiles)} dialogues (think={think}, difficulty={fv.difficulty})")
        sampler = Sampler(policy.model, mesh=mesh)
        report = evaluate_policy(policy.model, policy.tokenizer, user, profiles, settings,
                                 rollout_settings, sampler, fv.seed, batch_size=fv.batch_size,
                                 progress=None if fv.quiet else log)
    report.policy = policy.source
    report.profiles = {"source": profiles_desc, "spec": fv.profiles, "n": len(profiles)}
    report.simulator.update(sim_source)
    if kind == "llm":
        report.simulator["sampling"] = dataclasses.asdict(sampling)
        report.simulator["tokenizer"] = sim_tok.spec
    report.settings.update(difficulty=fv.difficulty,
                           simulator_overrides=_parse_overrides(fv.simulator_override),
                           max_dialogues=fv.max_dialogues)
    report.timing["load_s"] = load_s
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 bad input, 2 usage error)."""
    from absl import flags
    argv = list(sys.argv if argv is None else argv)
    fv = _define_flags()
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip().split("\n\n")[0] + "\n\n" + fv.get_help())
        return 0
    try:
        rest = fv(argv)
        if len(rest) > 1:
            raise flags.Error(f"unexpected arguments: {rest[1:]}")
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
