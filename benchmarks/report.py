"""Renders benchmarks/results/*.jsonl as markdown tables (and optionally into the README).

Tables: sampling, forward, update step, RL step, any other benchmark kind (generic
columns), the roofline probes, and the last suite run.

    python -m benchmarks.report                 # print the tables
    python -m benchmarks.report --update_readme # replace the block between the markers

Only the latest record of each (benchmark, config, machine kind) is shown.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

from benchmarks.common import RESULTS_DIR

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


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


def _latest(records: list[dict]) -> list[dict]:
    keep: dict[str, dict] = {}
    for r in records:
        m = r.get("machine", {})
        key = json.dumps([r["benchmark"], r["config"], m.get("device_kind"), m.get("cpu_count")],
                         sort_keys=True)
        if key not in keep or r.get("time", "") >= keep[key].get("time", ""):
            keep[key] = r
    return list(keep.values())


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
                "| roofline | compile s | peak RSS GB | load |",
                "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in sampling:
            c, ro, m = r["config"], r["roofline"], r.get("machine", {})
            out.append(
                f"| {_device(r)} | {c['preset']} | {c['dtype']} | {c['batch']} | "
                f"{c['prompt_len']} | {c['new_tokens']} | {_num(r['tokens_per_s'])} | "
                f"{_num(r['peer_tokens_per_s'])} | {_num(r['ratio'], '{:.2f}x')} | "
                f"{_num(r['decode_tokens_per_s'])} | {_num(r['peer_decode_tokens_per_s'])} | "
                f"{_num(ro['achieved_step_s'] * 1e3)} | {_num(ro['ideal_step_s'] * 1e3)} | "
                f"{_num(ro['roofline_fraction'] * 100, '{:.0f}%')} | {_num(r['compile_s'])} | "
                f"{_num(r['peak_rss_bytes'] / 1e9, '{:.2f}')} | {m.get('load_avg_1m', '-')} |")
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
                "| compile s | peak RSS GB | load |",
                "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in forward:
            c, m = r["config"], r.get("machine", {})
            out.append(
                f"| {_device(r)} | {c['preset']} | {c['dtype']} | {c['batch']} | "
                f"{c['prompt_len']} | {_num(r['tokens_per_s'])} | "
                f"{_num(r['peer_tokens_per_s'])} | {_num(r['ratio'], '{:.2f}x')} | "
                f"{_num(r['compile_s'])} | {_num(r['peak_rss_bytes'] / 1e9, '{:.2f}')} | "
                f"{m.get('load_avg_1m', '-')} |")
        out.append("")
    out += _render_train_step(records)
    out += _render_rl_step(records)
    known = {"sampling", "forward", "train_step", "rl_step", "roofline", "suite"}
    for kind in sorted({r["benchmark"] for r in records} - known):
        out += _render_generic(kind, [r for r in records if r["benchmark"] == kind])
    out += _render_roofline(records)
    out += _render_suite(records)
    peers = sorted({r["peer"] for r in records if r.get("peer")})
    if peers:
        out.append(f"Peer: {', '.join(peers)}. `load` is the 1-minute load average when the "
                   "run started (other work on a shared machine slows both sides).")
    return "\n".join(out) + "\n"


def _gb(x) -> str:
    return _num(None if x is None else x / 1e9, "{:.2f}")


def _render_train_step(records: list[dict]) -> list[str]:
    rows = sorted((r for r in records if r["benchmark"] == "train_step"),
                  key=lambda r: (_device(r), r["config"]["preset"], r["config"]["batch"],
                                 r["config"]["prompt_len"]))
    if not rows:
        return []
    out = ["### Update step (policy loss, forward + backward + AdamW)", "",
           "| device | preset | dtype | batch | length | ours tok/s | peer fwd+bwd tok/s "
           "| ratio | peer +AdamW tok/s | step s | GFLOP/s | of matmul rate | MFU "
           "| compile s | XLA temp GB | peak RSS GB | load |",
           "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        c, ro, m = r["config"], r.get("roofline") or {}, r.get("machine", {})
        mem = r.get("memory") or {}
        out.append(
            f"| {_device(r)} | {c['preset']} | {c['dtype']} | {c['batch']} | "
            f"{c['prompt_len']} | {_num(r['tokens_per_s'])} | {_num(r['peer_tokens_per_s'])} "
            f"| {_num(r['ratio'], '{:.2f}x')} | "
            f"{_num(r.get('peer_with_optimizer_tokens_per_s'))} | {_num(r['step_s'], '{:.3f}')} "
            f"| {_num(ro.get('achieved_flops_per_s') and ro['achieved_flops_per_s'] / 1e9)} | "
            f"{_num(ro.get('roofline_fraction') and ro['roofline_fraction'] * 100, '{:.0f}%')} "
            f"| {_num(ro.get('mfu') and ro['mfu'] * 100, '{:.1f}%')} | {_num(r['compile_s'])} "
            f"| {_gb(mem.get('temp'))} | {_gb(r.get('peak_rss_bytes'))} | "
            f"{m.get('load_avg_1m', '-')} |")
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
    out = ["### RL step (`Trainer.train_step`)", "",
           "| device | config | simulator | dialogues | all tok/s | policy tok/s | step s "
           "| policy sampling s | simulator s | rollout other s | log-probs s | update s "
           "| first step s | compiles/step after warm-up | sampler programs | load |",
           "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|--:|"]
    for r in rows:
        c, t, m = r["config"], r["time_split"], r.get("machine", {})
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
            f"{m.get('load_avg_1m', '-')} |")
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
           "| compile s | peak RSS GB | load |",
           "|---|" + "---|" * len(keys) + "--:|--:|--:|--:|--:|--:|"]
    for r in sorted(rows, key=lambda r: json.dumps(r["config"], sort_keys=True)):
        m = r.get("machine", {})
        cells = [str(r["config"].get(k, "-")) for k in keys]
        out.append(f"| {_device(r)} | " + " | ".join(cells) +
                   f" | {_num(r.get('tokens_per_s'))} | {_num(r.get('peer_tokens_per_s'))} | "
                   f"{_num(r.get('ratio'), '{:.2f}x')} | {_num(r.get('compile_s'))} | "
                   f"{_gb(r.get('peak_rss_bytes'))} | {m.get('load_avg_1m', '-')} |")
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
           "| matmul bfloat16 GFLOP/s | load | when |", "|---|--:|--:|--:|--:|---|"]
    for r in sorted(rows, key=lambda r: r.get("time", ""))[-3:]:
        out.append(f"| {_device(r)} | {_num(r['bandwidth_bytes_per_s'] / 1e9)} | "
                   f"{_num(r['matmul_float32_flops_per_s'] / 1e9)} | "
                   f"{_num(r.get('matmul_bfloat16_flops_per_s') and r['matmul_bfloat16_flops_per_s'] / 1e9)} "
                   f"| {r.get('machine', {}).get('load_avg_1m', '-')} | {r.get('time', '-')} |")
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
    return [f"Last suite run (`{r['config']['suite']}`, {r.get('time', '?')}): "
            f"{r['wall_s']:.0f}s in all, load average {r['load_avg_1m_at_start']} at the start "
            f"and {r['load_avg_1m_at_end']} at the end; " + "; ".join(parts) + ".", ""]


def update_readme(table: str, path: str = README) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path}: missing the {BEGIN} / {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n{table}{END}{tail}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results_dir", default=RESULTS_DIR)
    p.add_argument("--update_readme", action="store_true")
    args = p.parse_args(argv)
    table = render(load(args.results_dir))
    if args.update_readme:
        update_readme(table)
    print(table)


if __name__ == "__main__":
    main()
