"""The evaluation report: aggregates of the dialogue records, the files it writes
(report.json, dialogues.jsonl, PNG plots) and the terminal summary.

The protocol's outcome thresholds: a dialogue ending at emotion 100 is a success, one
ending below 10 a failure (SAGE / Sentient).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

from rlver_jax.env import simulator as sim
from rlver_jax.env.profiles import HIDDEN_NEEDS, OTHER_NEED, PERSONALITIES

TOY_WARNING = ("TOY SIMULATOR: the 'rule' user is a lexicon judge with template replies, not "
               "an LLM; these numbers are NOT comparable to the paper's Sentient scores. Pass "
               "--config.simulator.hf_dir for a real evaluation.")

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
    """An input (workdir, model directory, profiles, config) cannot be used; one line."""


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

