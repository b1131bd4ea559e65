"""Runs a benchmark suite, measures the machine's roofline, and regenerates the README tables.

    python -m benchmarks.run --suite quick          # `make bench`: about 10 min on 2 cores
    python -m benchmarks.run --suite targets        # the configurations the targets name
    python -m benchmarks.run --suite full           # the full grids (hours on a CPU)
    python -m benchmarks.run --suite quick --only train_step rl_step --out scratch_results

Each benchmark runs in its own Python process: peak RSS is then that benchmark's own, JAX
caches do not carry over, and one failure does not stop the suite (the exit status is 1 if
any benchmark failed). Results are appended as JSON lines to `<out>/<benchmark>.jsonl`;
the roofline probes go to `<out>/roofline.jsonl` and the suite's own timings to
`<out>/suite.jsonl`. When `--out` is the default results folder, the tables and "where we
stand" in benchmarks/README.md are regenerated (`benchmarks.report`); a run whose load
average at its start exceeded the core count is recorded with `high_load` and does not
replace quiet numbers there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchmarks import common

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TUNIX_PYTHON = os.path.join(HERE, ".venv-tunix", "bin", "python")

# Per suite: benchmark module -> its command-line arguments (its own parse_args).
SUITES: dict[str, dict[str, list[str]]] = {
    "quick": {
        "attention": ["--quick"],
        "forward": ["--quick"],
        "sampling": ["--quick"],
        "rollout": ["--quick"],
        "train_step": ["--quick"],
        "rl_step": ["--quick"],
        "peers.tunix_sampler": ["--quick"],
    },
    # Exactly the configurations "where we stand" judges beyond the quick ones (issue #13's
    # targets at full size), in one run so that one start load covers them all.
    "targets": {
        "attention": ["--length", "1024", "2048", "4096", "8192"],
        "forward": ["--batch", "1", "--length", "2048"],
        "sampling": ["--batch", "1", "8", "--prompt_len", "128", "512", "--new_tokens", "32"],
        "train_step": ["--preset", "small-100m", "--batch", "2", "--length", "512", "2048"],
        "peers.tunix_sampler": ["--batch", "8", "--prompt_len", "128", "512",
                                "--new_tokens", "32"],
    },
    "full": {
        "attention": ["--backward"],
        "forward": ["--batch", "1", "8", "--length", "128", "512", "2048"],
        "sampling": [],
        "rollout": [],
        "train_step": [],
        "rl_step": [],
        "peers.tunix_sampler": [],
    },
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--out", default=common.RESULTS_DIR, help="results folder")
    p.add_argument("--only", nargs="+", default=None, help="a subset of the suite's benchmarks")
    p.add_argument("--no_roofline", action="store_true")
    p.add_argument("--no_readme", action="store_true", help="do not rewrite README tables")
    return p.parse_args(argv)


def _source(module: str) -> str | None:
    path = os.path.join(HERE, *module.split(".")) + ".py"
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def available(module: str) -> tuple[bool, str]:
    """Whether a benchmark can run here, and why not. Read from the source, not imported:
    a module that is still being written must not break the suite."""
    text = _source(module)
    if text is None:
        return False, "not present"
    if "def run(" not in text or "def parse_args(" not in text:
        return False, "does not expose run(args) and parse_args(argv)"
    if module == "peers.tunix_sampler" and not os.path.exists(TUNIX_PYTHON):
        return False, "benchmarks/.venv-tunix is missing (make bench-peers creates it)"
    return True, ""


def _benchmark_argv(module: str, base: list[str], out: str) -> list[str]:
    text = _source(module) or ""
    argv = list(base)
    # Benchmarks written by others may not know every suite flag: pass only what they parse.
    argv = [a for a in argv if not a.startswith("--") or f'"{a}"' in text]
    if '"--results_dir"' in text:
        argv += ["--results_dir", out]
    return argv


def run_benchmark(module: str, argv: list[str]) -> tuple[int, float]:
    """Runs `benchmarks.<module>.run(parse_args(argv))` in a fresh interpreter."""
    code = ("import sys; import benchmarks.{m} as b; b.run(b.parse_args(sys.argv[1:]))"
            .format(m=module))
    t0 = time.perf_counter()
    rc = subprocess.call([sys.executable, "-c", code, *argv], cwd=ROOT)
    return rc, time.perf_counter() - t0


def measure_roofline(out: str) -> dict:
    """Memory bandwidth (`common.measure_bandwidths`) and matmul rate of this machine."""
    import jax

    machine = common.machine_info()
    rates = common.measure_bandwidths()
    rates["matmul_float32_flops_per_s"] = common.measure_matmul_flops(dtype="float32")
    if jax.default_backend() != "cpu":
        rates["matmul_bfloat16_flops_per_s"] = common.measure_matmul_flops(
            size=8192, dtype="bfloat16")
    record = common.base_record("roofline", {"probe": "copy+matmul"}, machine)
    record.update(rates, peer=None, tokens_per_s=None, peer_tokens_per_s=None, ratio=None,
                  compile_s=None)
    common.append_results("roofline", [record], out)
    print(f"roofline: bandwidth {rates['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, matmul "
          f"{rates['matmul_float32_flops_per_s'] / 1e9:.1f} GFLOP/s (float32)", flush=True)
    return record


def main(argv=None) -> None:
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    suite = SUITES[args.suite]
    names = args.only or list(suite)
    unknown = [n for n in names if n not in suite]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; suite {args.suite!r} has "
                         f"{sorted(suite)}")
    t_suite = time.perf_counter()
    load_start = os.getloadavg()[0]
    # Every benchmark (and the suite record) judges "high load" by the load before the suite
    # began: later, the suite's own previous benchmark keeps the load average near the core
    # count.
    os.environ[common.SUITE_LOAD_ENV] = f"{load_start:.2f}"
    summary: dict[str, dict] = {}
    if not args.no_roofline:
        t0 = time.perf_counter()
        measure_roofline(out)
        summary["roofline"] = {"status": "ok", "wall_s": time.perf_counter() - t0}
    for name in names:
        ok, why = available(name)
        if not ok:
            print(f"== {name}: skipped ({why})", flush=True)
            summary[name] = {"status": "skipped", "reason": why}
            continue
        argv_b = _benchmark_argv(name, suite[name], out)
        load = os.getloadavg()[0]
        print(f"== {name} {' '.join(argv_b)} (load average {load:.2f})", flush=True)
        rc, wall = run_benchmark(name, argv_b)
        summary[name] = {"status": "ok" if rc == 0 else f"failed (exit {rc})",
                         "wall_s": wall, "load_avg_1m_at_start": round(load, 2)}
        print(f"== {name}: {summary[name]['status']} in {wall:.0f}s", flush=True)
    record = common.base_record("suite", {"suite": args.suite, "only": args.only},
                                common.machine_info())
    record.update(benchmarks=summary, wall_s=time.perf_counter() - t_suite,
                  load_avg_1m_at_start=round(load_start, 2),
                  load_avg_1m_at_end=round(os.getloadavg()[0], 2),
                  cores=common.core_count(record["machine"]),
                  peer=None, tokens_per_s=None, peer_tokens_per_s=None, ratio=None)
    common.append_results("suite", [record], out)

    from benchmarks import report
    records = report.load(out)
    table, standing = report.render(records), report.render_standing(records)
    if not args.no_readme and out == os.path.abspath(common.RESULTS_DIR):
        report.update_readme(table, standing_table=standing)
    print(table)
    print(standing)
    print(f"suite {args.suite}: {record['wall_s']:.0f}s; " + ", ".join(
        f"{k} {v['status']}" for k, v in summary.items()))
    if any(v["status"].startswith("failed") for v in summary.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
