"""Renders benchmarks/results/*.jsonl as markdown tables (and optionally into the README).

Tables: attention, sampling, forward, update step, RL step, any other benchmark kind
(generic columns), the roofline probes, the last suite run; and "where we stand": each of
issue #13's targets beside the measured ours / peer ratios (median, per-round range, load),
met / not met.

    python -m benchmarks.report                 # print the tables
    python -m benchmarks.report --update_readme # replace the blocks between the markers

Only the latest record of each (benchmark, config, machine kind) is shown, and a quiet one
wins over a later one taken under high load (`high_load`: the run's load average at start
exceeded the core count). High-load records are shown marked in the detailed tables and
never decide "where we stand".
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
from typing import Callable

from benchmarks.common import RESULTS_DIR, core_count, is_high_load, start_load

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
STANDING_BEGIN, STANDING_END = "<!-- standing:begin -->", "<!-- standing:end -->"


def load(results_dir: str = RESULTS_DIR) -> list[dict]:
    records = []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if line:
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{n}: invalid JSON: {e.msg}") from e
    return records


def high_load(r: dict) -> bool:
    """The record's flag; records written before the flag existed are judged the same way."""
    flag = r.get("high_load")
    return is_high_load(r.get("machine", {})) if flag is None else bool(flag)


def _latest(records: list[dict]) -> list[dict]:
    """The latest record per (benchmark, config, machine kind); a quiet one beats any later
    high-load one."""
    keep: dict[str, dict] = {}
    for r in records:
        m = r.get("machine", {})
        key = json.dumps([r["benchmark"], r["config"], m.get("device_kind"), m.get("cpu_count")],
                         sort_keys=True)
        rank = (not high_load(r), r.get("time", ""))
        old = keep.get(key)
        if old is None or rank >= (not high_load(old), old.get("time", "")):
            keep[key] = r
    return list(keep.values())


def _load(r: dict) -> str:
    """Load average at the run's start (-> at the record's end), flagged when high."""
    m = r.get("machine", {})
    load = start_load(m)
    text = "-" if load is None else f"{load:g}"
    if r.get("load_avg_1m_at_end") is not None:
        text += f" / {r['load_avg_1m_at_end']:g}"
    return text + (" (high)" if high_load(r) else "")


def _ratio(r: dict) -> str:
    """ours / peer: the median ratio and, from interleaved runs, the per-round range."""
    if r.get("ratio") is None:
        return "-"
    text = f"{r['ratio']:.2f}x"
    if r.get("ratio_min") is not None and r.get("ratio_max") is not None:
        text += f" [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]"
    return text


def _num(x, fmt="{:,.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _device(r: dict) -> str:
    m = r.get("machine", {})
    return f"{m.get('device_kind', '?')} x{m.get('usable_cpus', m.get('cpu_count', '?'))}" \
        if m.get("backend") == "cpu" else str(m.get("device_kind", "?"))


def render(records: list[dict]) -> str:
    records = _latest(records)
    out = []
    sampling = sorted((r for r in records if r["benchmark"] == "sampling"),
                      key=lambda r: (r["config"]["preset"], r["config"]["prompt_len"],
                                     r["config"]["batch"]))
    if sampling:
        out += ["### Sampling (greedy decode)", "",
                "| device | preset | dtype | batch | prompt | new | ours tok/s | peer tok/s "
                "| ratio | ours decode tok/s | peer decode tok/s | step ms | ideal ms "
                "| roofline | compile s | peak RSS GB | load start / end |",
                "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in sampling:
            c, ro = r["config"], r["roofline"]
            out.append(
                f"| {_device(r)} | {c['preset']} | {c['dtype']} | {c['batch']} | "
                f"{c['prompt_len']} | {c['new_tokens']} | {_num(r['tokens_per_s'])} | "
                f"{_num(r['peer_tokens_per_s'])} | {_ratio(r)} | "
                f"{_num(r['decode_tokens_per_s'])} | {_num(r['peer_decode_tokens_per_s'])} | "
                f"{_num(ro['achieved_step_s'] * 1e3)} | {_num(ro['ideal_step_s'] * 1e3)} | "
                f"{_num(ro['roofline_fraction'] * 100, '{:.0f}%')} | {_num(r['compile_s'])} | "
                f"{_num(r['peak_rss_bytes'] / 1e9, '{:.2f}')} | {_load(r)} |")
        ro = sampling[-1]["roofline"]
        out += ["", f"Measured rates (last run): memory bandwidth "
                f"{ro['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, matmul "
                f"{ro['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s.", ""]
    forward = sorted((r for r in records if r["benchmark"] == "forward"),
                     key=lambda r: (r["config"]["preset"], r["config"]["prompt_len"],
                                    r["config"]["batch"]))
    if forward:
        out += ["### Forward (prefill, full logits)", "",
                "| device | preset | dtype | batch | length | ours tok/s | peer tok/s | ratio "
                "| compile s | peak RSS GB | load start / end |",
                "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in forward:
            c = r["config"]
            out.append(
                f"| {_device(r)} | {c['preset']} | {c['dtype']} | {c['batch']} | "
                f"{c['prompt_len']} | {_num(r['tokens_per_s'])} | "
                f"{_num(r['peer_tokens_per_s'])} | {_ratio(r)} | "
                f"{_num(r['compile_s'])} | {_num(r['peak_rss_bytes'] / 1e9, '{:.2f}')} | "
                f"{_load(r)} |")
        out.append("")
    out += _render_attention(records)
    out += _render_train_step(records)
    out += _render_rl_step(records)
    known = {"attention", "sampling", "forward", "train_step", "rl_step", "roofline", "suite"}
    for kind in sorted({r["benchmark"] for r in records} - known):
        out += _render_generic(kind, [r for r in records if r["benchmark"] == kind])
    out += _render_roofline(records)
    out += _render_suite(records)
    peers = sorted({r["peer"] for r in records if r.get("peer")})
    if peers:
        out.append(f"Peer: {', '.join(peers)}. Ratios are ours / peer speed: the median "
                   "over interleaved rounds (ours, peer, ours, ...) and [min, max] of the "
                   "per-round ratios (records from before interleaving have no range). "
                   "`load start / end` is the 1-minute load average when the run started "
                   "(the suite's, inside a suite) and when the record was written; "
                   "`(high)`: it started above the core count.")
    return "\n".join(out) + "\n"


def _gb(x) -> str:
    return _num(None if x is None else x / 1e9, "{:.2f}")


def _render_attention(records: list[dict]) -> list[str]:
    rows = sorted((r for r in records if r["benchmark"] == "attention"),
                  key=lambda r: (_device(r), r["config"]["pass"], r["config"]["heads"],
                                 r["config"]["kv_heads"], r["config"]["head_dim"],
                                 r["config"]["length"], r["config"]["implementation"]))
    if not rows:
        return []
    out = ["### Attention op (causal prefill over a padded slot cache)", "",
           "| device | pass | dtype | batch | T = S | heads | head dim | implementation "
           "| ours ms | peer ms | ratio | XLA temp MB | max abs err | load start / end |",
           "|---|---|---|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        c = r["config"]
        head = (f"| {_device(r)} | {c['pass']} | {c['dtype']} | {c['batch']} | {c['length']} "
                f"| {c['heads']}/{c['kv_heads']} | {c['head_dim']} | {c['implementation']} ")
        if r.get("status", "ok") != "ok":
            out.append(head + f"| skipped: {r.get('reason')} | | | "
                       f"{_num(r.get('temp_bytes') and r['temp_bytes'] / 2**20, '{:,.0f}')} "
                       f"| | {_load(r)} |")
            continue
        err = r.get("max_abs_err")
        out.append(head + f"| {_num(r['step_s'] * 1e3)} | "
                   f"{_num(r.get('peer_step_s') and r['peer_step_s'] * 1e3)} | {_ratio(r)} | "
                   f"{_num(r.get('temp_bytes') and r['temp_bytes'] / 2**20, '{:,.0f}')} | "
                   f"{'-' if err is None else f'{err:.1e}'} | {_load(r)} |")
    sources = sorted({r.get("implementation_source", "?") for r in rows})
    out += ["", f"Ours from {', '.join(sources)}; peer: torch `scaled_dot_product_attention` "
            "with a boolean [B, 1, T, S] mask and `enable_gqa=True`. Left padding of up to "
            f"{max(r['config']['pad_fraction'] for r in rows):.0%} of T per row; `max abs "
            "err` against the reference einsum on the rows' real queries.", ""]
    return out


def _render_train_step(records: list[dict]) -> list[str]:
    rows = sorted((r for r in records if r["benchmark"] == "train_step"),
                  key=lambda r: (_device(r), r["config"]["preset"], r["config"]["batch"],
                                 r["config"]["prompt_len"]))
    if not rows:
        return []
    out = ["### Update step (policy loss, forward + backward + AdamW)", "",
           "| device | preset | dtype | batch | length | ours tok/s | peer fwd+bwd tok/s "
           "| ratio | peer +AdamW tok/s | step s | GFLOP/s | of matmul rate | MFU "
           "| compile s | XLA temp GB | peak RSS GB | load start / end |",
           "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        c, ro = r["config"], r.get("roofline") or {}
        mem = r.get("memory") or {}
        out.append(
            f"| {_device(r)} | {c['preset']} | {c['dtype']} | {c['batch']} | "
            f"{c['prompt_len']} | {_num(r['tokens_per_s'])} | {_num(r['peer_tokens_per_s'])} "
            f"| {_ratio(r)} | "
            f"{_num(r.get('peer_with_optimizer_tokens_per_s'))} | {_num(r['step_s'], '{:.3f}')} "
            f"| {_num(ro.get('achieved_flops_per_s') and ro['achieved_flops_per_s'] / 1e9)} | "
            f"{_num(ro.get('roofline_fraction') and ro['roofline_fraction'] * 100, '{:.0f}%')} "
            f"| {_num(ro.get('mfu') and ro['mfu'] * 100, '{:.1f}%')} | {_num(r['compile_s'])} "
            f"| {_gb(mem.get('temp'))} | {_gb(r.get('peak_rss_bytes'))} | "
            f"{_load(r)} |")
    out += ["", "Ours: `Updater.step` (PPO clipped-ratio loss over chunked LM-head log-probs, "
            "global-norm clipping, AdamW). Peer: `loss = model(ids, labels=ids).loss; "
            "loss.backward()` (mean token cross-entropy); `ratio` = ours / peer forward + "
            "backward, the `+AdamW` column adds torch's optimiser step. GFLOP/s from "
            "6 x params x tokens + 12 x layers x heads x head_dim x T x tokens. Plot: "
            "`results/update_vs_length.png`.", ""]
    return out


def _render_rl_step(records: list[dict]) -> list[str]:
    rows = sorted((r for r in records if r["benchmark"] == "rl_step"),
                  key=lambda r: (_device(r), r["config"]["config"]))
    if not rows:
        return []
    out = ["### RL step (`train.train_step`)", "",
           "| device | config | simulator | dialogues | all tok/s | policy tok/s | step s "
           "| policy sampling s | simulator s | rollout other s | log-probs s | update s "
           "| first step s | compiles/step after warm-up | sampler programs | load start / end |",
           "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|"]
    for r in rows:
        c, t = r["config"], r["time_split"]
        sim = c["simulator"] + (f" ({c['simulator_preset']})" if c.get("simulator_preset")
                                else "")
        programs = " > ".join(f"{p:.0f}" for p in r["sampler_programs"])
        out.append(
            f"| {_device(r)} | {c['config']} | {sim} | {c['batch_dialogues']} | "
            f"{_num(r['tokens_per_s'])} | {_num(r['policy_tokens_per_s'])} | "
            f"{_num(t['step_s'], '{:.2f}')} | {_num(t['policy_sampling_s'], '{:.2f}')} | "
            f"{_num(t['simulator_s'], '{:.2f}')} | {_num(t['rollout_other_s'], '{:.2f}')} | "
            f"{_num(t['logprobs_s'], '{:.2f}')} | {_num(t['update_s'], '{:.2f}')} | "
            f"{_num(r['first_step_s'], '{:.1f}')} | "
            f"{' / '.join(str(n) for n in r['compiles_per_step'])} | {programs} | "
            f"{_load(r)} |")
    out += ["", "Times are means over the measured steps (after "
            f"{rows[0]['config']['warmup_steps']} warm-up step(s)) that compiled nothing "
            "(`averaged_steps` in the record). `all tok/s` counts policy "
            "and simulator generated tokens; `policy tok/s` only the policy's. Compiles are "
            "XLA backend compilations of any program during each measured step; sampler "
            "programs is `compile/sampler_programs` after each step, warm-up included.", ""]
    late = [r for r in rows if r.get("compiled_after_warmup")]
    for r in late:
        names = sorted({name for step in r["compiled_after_warmup"] for name, _ in step})
        out.append(f"Compiled after warm-up in `{r['config']['config']}`: "
                   f"{', '.join(f'`{n}`' for n in names)}.")
    if late:
        out.append("")
    return out


def _render_generic(kind: str, rows: list[dict]) -> list[str]:
    """Any other benchmark (e.g. rollout): its config keys plus the common fields."""
    keys = sorted({k for r in rows for k, v in r["config"].items()
                   if not isinstance(v, (dict, list))})
    out = [f"### {kind.replace('_', ' ').capitalize()}", "",
           "| device | " + " | ".join(keys) + " | ours tok/s | peer tok/s | ratio "
           "| compile s | peak RSS GB | load start / end |",
           "|---|" + "---|" * len(keys) + "--:|--:|--:|--:|--:|--:|"]
    for r in sorted(rows, key=lambda r: json.dumps(r["config"], sort_keys=True)):
        cells = [str(r["config"].get(k, "-")) for k in keys]
        out.append(f"| {_device(r)} | " + " | ".join(cells) +
                   f" | {_num(r.get('tokens_per_s'))} | {_num(r.get('peer_tokens_per_s'))} | "
                   f"{_ratio(r)} | {_num(r.get('compile_s'))} | "
                   f"{_gb(r.get('peak_rss_bytes'))} | {_load(r)} |")
    out.append("")
    # Fits over a sweep (e.g. rollout's time ~ turns^k) repeat on each of its records.
    fits = {json.dumps({k: v for k, v in r["config"].items() if k not in ("turns", "batch")},
                       sort_keys=True): r["growth"] for r in rows if r.get("growth")}
    for key, growth in sorted(fits.items()):
        cfg = ", ".join(f"{k}={v}" for k, v in json.loads(key).items())
        out.append(f"Growth exponents k (time ~ turns^k; 1 = linear) for {cfg}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(growth.items())) + ".")
    if fits:
        out.append("")
    return out


def _render_roofline(records: list[dict]) -> list[str]:
    rows = [r for r in records if r["benchmark"] == "roofline"]
    if not rows:
        return []
    out = ["### Machine roofline (probes)", "",
           "| device | memory bandwidth GB/s | matmul float32 GFLOP/s "
           "| matmul bfloat16 GFLOP/s | load start / end | when |", "|---|--:|--:|--:|--:|---|"]
    for r in sorted(rows, key=lambda r: r.get("time", ""))[-3:]:
        out.append(f"| {_device(r)} | {_num(r['bandwidth_bytes_per_s'] / 1e9)} | "
                   f"{_num(r['matmul_float32_flops_per_s'] / 1e9)} | "
                   f"{_num(r.get('matmul_bfloat16_flops_per_s') and r['matmul_bfloat16_flops_per_s'] / 1e9)} "
                   f"| {_load(r)} | {r.get('time', '-')} |")
    out.append("")
    return out


def _render_suite(records: list[dict]) -> list[str]:
    rows = sorted((r for r in records if r["benchmark"] == "suite"),
                  key=lambda r: r.get("time", ""))
    if not rows:
        return []
    full = [r for r in rows if not r["config"].get("only")]
    r = full[-1] if full else rows[-1]
    parts = [f"{k} {v['status']}" + (f" {v['wall_s']:.0f}s" if "wall_s" in v else "")
             + (f" ({v['reason']})" if v.get("reason") else "")
             for k, v in r["benchmarks"].items()]
    cores = r.get("cores") or core_count(r.get("machine", {}))
    high = cores is not None and r["load_avg_1m_at_start"] > cores
    return [f"Last suite run (`{r['config']['suite']}`, {r.get('time', '?')}): "
            f"{r['wall_s']:.0f}s in all, load average {r['load_avg_1m_at_start']} at the start "
            f"and {r['load_avg_1m_at_end']} at the end"
            + (f" (high load: above the {cores} cores)" if high else "") + "; "
            + "; ".join(parts) + ".", ""]


# ------------------------------------------------------------------- where we stand
@dataclasses.dataclass(frozen=True)
class Target:
    """One "done when" line of issue #13: every quiet CPU record of `benchmark` whose
    config passes `where` must reach `threshold` in `metric` ("ratio": ours / peer speed;
    "roofline": the decode step's fraction of the bandwidth roofline)."""
    goal: str
    benchmark: str
    where: Callable[[dict], bool]
    threshold: float
    metric: str = "ratio"


TARGETS = (
    Target("attention op vs torch SDPA, T >= 1,024 (`auto`)", "attention",
           lambda c: c["length"] >= 1024 and c["implementation"] == "auto", 1.0),
    Target("model forward vs transformers, T = 2,048", "forward",
           lambda c: c["prompt_len"] == 2048, 1.0),
    Target("update step vs torch forward + backward, T = 512", "train_step",
           lambda c: c["prompt_len"] == 512, 1.0),
    Target("update step vs torch forward + backward, T = 2,048", "train_step",
           lambda c: c["prompt_len"] == 2048, 1.0),
    Target("greedy sampling vs `generate`, batch 8, prompt 128", "sampling",
           lambda c: c["batch"] == 8 and c["prompt_len"] == 128, 1.2),
    Target("greedy sampling vs `generate`, batch 8, prompt 512", "sampling",
           lambda c: c["batch"] == 8 and c["prompt_len"] == 512, 1.2),
    Target("greedy sampling vs Tunix's sampler", "sampling_tunix", lambda c: True, 1.0),
    Target("decode step vs bandwidth roofline, batch 1", "sampling",
           lambda c: c["batch"] == 1, 0.8, "roofline"),
    Target("decode step vs bandwidth roofline, batch 8", "sampling",
           lambda c: c["batch"] == 8, 0.8, "roofline"),
)


def _metric(r: dict, metric: str) -> tuple[float | None, float | None, float | None]:
    """(median, low, high) of a record's metric; the range is None where not measured."""
    if metric == "roofline":
        fraction = (r.get("roofline") or {}).get("roofline_fraction")
        return fraction, None, None
    return r.get("ratio"), r.get("ratio_min"), r.get("ratio_max")


def _fmt_metric(value, low, high, metric: str) -> str:
    if value is None:
        return "-"
    if metric == "roofline":
        return f"{value:.0%}"
    return f"{value:.2f}x" + (f" [{low:.2f}, {high:.2f}]" if low is not None
                              and high is not None else "")


def _describe(r: dict) -> str:
    c = r["config"]
    keys = ("preset", "implementation", "pass", "batch", "prompt_len", "length", "heads",
            "kv_heads", "head_dim", "new_tokens")
    parts = [f"{k}={c[k]}" for k in keys if k in c and c[k] not in (None, 0)]
    return " ".join(parts) + f" ({r.get('time', '?')[:10]})"


def standing(records: list[dict], targets=TARGETS) -> list[dict]:
    """Per target: its quiet CPU records (latest per config), the worst one, met / not met."""
    cpu = [r for r in records if r.get("machine", {}).get("backend") == "cpu"
           and r.get("status", "ok") == "ok"]
    quiet = _latest([r for r in cpu if not high_load(r)])
    rows = []
    for t in targets:
        def matches(r, t=t):
            return r["benchmark"] == t.benchmark and t.where(r["config"])

        measured = [r for r in quiet if matches(r) and _metric(r, t.metric)[0] is not None]
        noisy = sum(1 for r in cpu if matches(r) and high_load(r))
        row = {"target": t, "records": measured, "high_load_records": noisy, "worst": None,
               "status": "no quiet run"}
        if measured:
            worst = min(measured, key=lambda r: _metric(r, t.metric)[0])
            row["worst"] = worst
            row["status"] = "met" if _metric(worst, t.metric)[0] >= t.threshold else "not met"
        rows.append(row)
    return rows


def render_standing(records: list[dict], targets=TARGETS) -> str:
    """The "where we stand" table (markdown)."""
    out = ["| goal | target | measured (worst of the quiet runs) | ours / peer: median "
           "[min, max] | load start / end | status |", "|---|--:|---|--:|--:|---|"]
    for row in standing(records, targets):
        t, worst = row["target"], row["worst"]
        target = f">= {t.threshold:.0%}" if t.metric == "roofline" else f">= {t.threshold:g}x"
        if worst is None:
            note = (f"{row['high_load_records']} high-load record(s) kept, not judged"
                    if row["high_load_records"] else "not measured")
            out.append(f"| {t.goal} | {target} | {note} | - | - | **no quiet run** |")
            continue
        n = len(row["records"])
        out.append(f"| {t.goal} | {target} | {_describe(worst)}"
                   + (f", worst of {n}" if n > 1 else "")
                   + f" | {_fmt_metric(*_metric(worst, t.metric), t.metric)} | {_load(worst)} "
                   f"| **{row['status']}** |")
    out += ["", "Generated by `python -m benchmarks.report` from `results/*.jsonl`: CPU records "
            "only, the latest per configuration among runs that started at a load average "
            "at or below the core count (the suite's load before it started, inside a suite). "
            "A target is met when its worst matching configuration is. Roofline rows have no "
            "range: the fraction comes from medians of generate and prefill."]
    return "\n".join(out) + "\n"


def _replace_block(text: str, begin: str, end: str, body: str, path: str) -> str:
    if begin not in text or end not in text:
        raise ValueError(f"{path}: missing the {begin} / {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}{end}{tail}"


def update_readme(table: str, path: str = README, standing_table: str | None = None) -> None:
    """Replaces the results block (and, given, the where-we-stand block) of the README."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    text = _replace_block(text, BEGIN, END, table, path)
    if standing_table is not None:
        text = _replace_block(text, STANDING_BEGIN, STANDING_END, standing_table, path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results_dir", default=RESULTS_DIR)
    p.add_argument("--update_readme", action="store_true")
    args = p.parse_args(argv)
    records = load(args.results_dir)
    table, standing_table = render(records), render_standing(records)
    if args.update_readme:
        update_readme(table, standing_table=standing_table)
    print(table)
    print(standing_table)


if __name__ == "__main__":
    main()
