"""Renders benchmarks/results/*.jsonl as markdown tables (and optionally into the README).

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
    peers = sorted({r["peer"] for r in records if r.get("peer")})
    if peers:
        out.append(f"Peer: {', '.join(peers)}. `load` is the 1-minute load average when the "
                   "run started (other work on a shared machine slows both sides).")
    return "\n".join(out) + "\n"


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
