"""The benchmark harness without timing: interleaving order, spread statistics, the
high-load rule, and the generated "where we stand" table on synthetic records."""

import json

import pytest

from benchmarks import attention, common, report


# ------------------------------------------------------------------------ interleaving
def test_interleave_order_alternates_ours_and_peer():
    assert common.interleave_order(["ours", "peer"], 3) == [
        "ours", "peer", "ours", "peer", "ours", "peer"]
    assert common.interleave_order(["a", "b", "peer"], 2) == ["a", "b", "peer", "a", "b", "peer"]
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        common.interleave_order(["ours"], 0)


def test_time_interleaved_calls_in_order_and_times_each_call():
    calls, now = [], [0.0]
    cost = {"ours": 1.0, "peer": 5.0}

    def make(name):
        def fn():
            calls.append(name)
            now[0] += cost[name] + len(calls)  # every call takes a different, known time
        return fn

    times = common.time_interleaved({"ours": make("ours"), "peer": make("peer")}, 3,
                                    clock=lambda: now[0])
    assert calls == ["ours", "peer"] * 3
    assert times == {"ours": [2.0, 4.0, 6.0], "peer": [7.0, 9.0, 11.0]}


def test_spread_and_ratio_spread():
    s = common.spread([3.0, 1.0, 2.0, 10.0])
    assert (s["median_s"], s["min_s"], s["max_s"], s["n"]) == (2.5, 1.0, 10.0, 4)
    # Inclusive quartiles of 1, 2, 3, 10: 1 + 0.75 * 1 and 3 + 0.25 * 7.
    assert s["q1_s"] == pytest.approx(1.75) and s["q3_s"] == pytest.approx(4.75)
    assert s["times_s"] == [3.0, 1.0, 2.0, 10.0]  # in measurement order
    r = common.ratio_spread([1.0, 2.0, 4.0], [2.0, 2.0, 2.0])
    assert r["ratio"] == pytest.approx(1.0)  # median peer time / median our time
    assert r["ratio_per_round"] == [2.0, 1.0, 0.5]
    assert (r["ratio_min"], r["ratio_max"]) == (0.5, 2.0)
    with pytest.raises(ValueError, match="paired rounds"):
        common.ratio_spread([1.0], [1.0, 2.0])


def test_fewer_than_three_rounds_is_a_parser_error(capsys):
    with pytest.raises(SystemExit):
        attention.parse_args(["--repeats", "2"])
    assert "at least 3 interleaved rounds" in capsys.readouterr().err


# ------------------------------------------------------------------------ high load
def test_high_load_uses_the_suite_start_load_when_there_is_one():
    assert common.is_high_load({"usable_cpus": 2, "load_avg_1m": 2.5})
    assert not common.is_high_load({"usable_cpus": 2, "load_avg_1m": 2.0})
    # Inside a suite the previous benchmark raised the load; the suite's start decides.
    assert not common.is_high_load({"usable_cpus": 2, "load_avg_1m": 3.1,
                                    "suite_load_avg_1m_at_start": 0.4})
    assert common.is_high_load({"cpu_count": 2, "load_avg_1m": 0.1,
                                "suite_load_avg_1m_at_start": 4.0})


# ----------------------------------------------------------------- synthetic records
def _record(benchmark, config, ratio, load, time, *, flag=True, low=None, high=None, **extra):
    machine = {"backend": "cpu", "device_kind": "cpu", "cpu_count": 2, "usable_cpus": 2,
               "load_avg_1m": load}
    r = {"benchmark": benchmark, "config": config, "time": time, "machine": machine,
         "ratio": ratio, "ratio_min": low, "ratio_max": high, "tokens_per_s": 100.0,
         "peer_tokens_per_s": 100.0 / ratio, "compile_s": 1.0, "peak_rss_bytes": 1e9,
         "peer": "torch", "load_avg_1m_at_end": load, **extra}
    if flag:  # records from before the flag existed have none
        r["high_load"] = common.is_high_load(machine)
    return r


def _forward(prompt_len):
    return {"preset": "small-100m", "batch": 1, "prompt_len": prompt_len, "new_tokens": 0,
            "dtype": "float32"}


def _write(tmp_path, records):
    for r in records:
        with open(tmp_path / f"{r['benchmark']}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(r) + "\n")
    return report.load(str(tmp_path))


def _rows(records):
    return {row["target"].goal: row for row in report.standing(records)}


def test_where_we_stand_met_not_met_and_high_load(tmp_path):
    sampling_b8 = {"preset": "small-100m", "batch": 8, "prompt_len": 128, "new_tokens": 16,
                   "dtype": "float32", "greedy": True}
    sampling_b1 = dict(sampling_b8, batch=1)
    records = _write(tmp_path, [
        _record("forward", _forward(2048), 1.3, 0.5, "2026-12-01T10:00", low=1.1, high=1.4),
        _record("train_step", _forward(512), 0.8, 1.0, "2026-12-01T10:00", low=0.7, high=0.9),
        # Quiet then a later high-load run of the same config: the quiet one stands.
        _record("sampling", sampling_b8, 1.1, 1.2, "2026-12-01T10:00", low=1.0, high=1.15,
                roofline={"roofline_fraction": 0.5}),
        _record("sampling", sampling_b8, 1.5, 7.0, "2026-12-01T11:00",
                roofline={"roofline_fraction": 0.95}),
        _record("sampling", sampling_b1, 1.0, 1.5, "2026-12-01T10:00",
                roofline={"roofline_fraction": 0.85}),
        # Only a high-load run, and an old record without the flag (judged by its load).
        _record("train_step", _forward(2048), 2.0, 9.0, "2026-12-01T10:00"),
        _record("forward", dict(_forward(2048), batch=8), 3.0, 6.0, "2026-11-01T10:00",
                flag=False),
    ])
    rows = _rows(records)
    fwd = rows["model forward vs transformers, T = 2,048"]
    assert fwd["status"] == "met" and len(fwd["records"]) == 1  # the old batch-8 is high load
    assert fwd["high_load_records"] == 1
    assert rows["update step vs torch forward + backward, T = 512"]["status"] == "not met"
    t2048 = rows["update step vs torch forward + backward, T = 2,048"]
    assert t2048["status"] == "no quiet run" and t2048["high_load_records"] == 1
    b8 = rows["greedy sampling vs `generate`, batch 8, prompt 128"]
    assert b8["status"] == "not met" and b8["worst"]["ratio"] == 1.1  # 1.1 < 1.2
    assert rows["decode step vs bandwidth roofline, batch 1"]["status"] == "met"
    assert rows["decode step vs bandwidth roofline, batch 8"]["status"] == "not met"  # 50%
    assert rows["greedy sampling vs Tunix's sampler"]["status"] == "no quiet run"

    table = report.render_standing(records)
    line = next(x for x in table.splitlines() if x.startswith("| model forward"))
    assert "1.30x [1.10, 1.40]" in line and "**met**" in line and "0.5 / 0.5" in line
    line = next(x for x in table.splitlines() if "T = 2,048" in x and "update" in x)
    assert "1 high-load record(s) kept, not judged" in line and "**no quiet run**" in line

    # Detailed tables: a later high-load run does not replace a quiet one; high rows marked.
    latest = [r for r in report._latest(records) if r["benchmark"] == "sampling"
              and r["config"]["batch"] == 8]
    assert [r["ratio"] for r in latest] == [1.1]
    detail = report.render([r for r in records if r["benchmark"] == "forward"])
    assert "| 1.30x [1.10, 1.40] |" in detail and "| 6 / 6 (high) |" in detail


def test_attention_target_reads_only_the_auto_implementation(tmp_path):
    def cfg(impl, length):
        return {"batch": 2, "length": length, "slots": length, "heads": 28, "kv_heads": 4,
                "group": 7, "head_dim": 128, "dtype": "float32", "pad_fraction": 0.25,
                "pass": "forward", "implementation": impl}

    records = _write(tmp_path, [
        _record("attention", cfg("auto", 512), 0.5, 0.5, "2026-12-01T10:00"),   # T < 1024
        _record("attention", cfg("auto", 1024), 1.2, 0.5, "2026-12-01T10:00"),
        _record("attention", cfg("auto", 4096), 1.05, 0.5, "2026-12-01T10:00"),
        _record("attention", cfg("reference", 4096), 0.1, 0.5, "2026-12-01T10:00"),
    ])
    row = _rows(records)["attention op vs torch SDPA, T >= 1,024 (`auto`)"]
    assert row["status"] == "met" and len(row["records"]) == 2
    assert row["worst"]["config"]["length"] == 4096


def test_update_readme_replaces_both_blocks(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"a\n{report.BEGIN}\nold\n{report.END}\nb\n{report.STANDING_BEGIN}\nold\n"
                    f"{report.STANDING_END}\nc\n", encoding="utf-8")
    report.update_readme("T\n", str(path), standing_table="S\n")
    assert path.read_text(encoding="utf-8") == (
        f"a\n{report.BEGIN}\nT\n{report.END}\nb\n{report.STANDING_BEGIN}\nS\n"
        f"{report.STANDING_END}\nc\n")
    path.write_text("no markers\n", encoding="utf-8")
    with pytest.raises(ValueError, match="missing the"):
        report.update_readme("T\n", str(path))


def test_attention_problem_masks_follow_the_slot_rule():
    prob = attention.problem(batch=3, length=8, heads=4, kv_heads=2, head_dim=2,
                             pad_fraction=0.5, dtype="float32")
    assert prob["pads"] == [0, 2, 4]
    for b, pad in enumerate(prob["pads"]):
        for t in range(8):
            for s in range(8):
                assert prob["allowed"][b, t, s] == (s >= pad and s <= t)
    real = attention.real_queries(prob["pads"], 8)
    assert real.sum(axis=1).tolist() == [8, 6, 4]


def test_tunix_worker_protocol_times_one_call_per_request(tmp_path):
    """The out-of-process peer is driven one call at a time (so it can be interleaved);
    a fake worker stands in for Tunix's, which needs its own venv."""
    import sys

    from benchmarks.peers import tunix_sampler

    calls = tmp_path / "calls.txt"
    code = ("import json, sys; from benchmarks.peers import tunix_sampler as t; "
            "print('noise from a library'); "
            "print('RESULT ' + json.dumps({'version': 'x', 'results': [1, 2]}), flush=True); "
            f"log = open({str(calls)!r}, 'a'); "
            "t.serve([lambda: log.write('0\\n'), lambda: log.write('1\\n')], sys.stdin, "
            "sys.stdout)")
    worker = tunix_sampler.PeerWorker([sys.executable, "-c", code], str(tmp_path / "log"))
    assert worker.header == {"version": "x", "results": [1, 2]}
    assert worker.run(1) >= 0.0 and worker.run(0) >= 0.0 and worker.run(1) >= 0.0
    with pytest.raises(RuntimeError, match="unknown command 'run 7'"):
        worker.run(7)
    assert worker.close() == 0
    assert calls.read_text().split() == ["1", "0", "1"]


def test_attention_benchmark_end_to_end_at_a_tiny_size():
    """Every implementation this checkout offers either runs (matching the reference einsum
    and torch on the real queries) or is recorded as skipped with its reason."""
    argv = ["--batch", "2", "--length", "16", "--heads", "4/2", "--head_dim", "8",
            "--no_save"]
    records = attention.run(attention.parse_args(argv))
    ok = [r for r in records if r["status"] == "ok"]
    assert ok, [r["reason"] for r in records]
    for r in records:
        assert r["benchmark"] == "attention" and r["config"]["group"] == 2
        assert r["status"] == "ok" or r["reason"]
    for r in ok:
        assert r["max_abs_err"] < 1e-5 and r["peer_max_abs_err"] < 1e-5
        assert r["timing"]["ours"]["n"] == r["timing"]["peer"]["n"] == 3
        assert len(r["ratio_per_round"]) == 3 and r["temp_bytes"] > 0
    # A program over the XLA temporaries budget is skipped, not run.
    skipped = attention.run(attention.parse_args(argv + ["--max_temp_bytes", "1",
                                                         "--peer", "none"]))
    assert all(r["status"] == "skipped" and r["reason"] for r in skipped)
    assert any("XLA temporaries" in r["reason"] for r in skipped)
