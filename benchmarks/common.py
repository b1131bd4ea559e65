"""Shared pieces of the benchmarks: machine info, result files, twin models, roofline probes.

Every benchmark appends one JSON object per measured configuration to
`benchmarks/results/<name>.jsonl` with at least: `benchmark`, `config` (preset, batch,
prompt length, new tokens, dtype), `peer`, `tokens_per_s`, `peer_tokens_per_s`, `ratio`
(ours / peer), `compile_s`, `peak_rss_bytes`, `device_memory_bytes` (None on CPU),
`machine` (load average at the run's start included), `load_avg_1m_at_end` and `high_load`
(the run started at a load above the core count; see `is_high_load`).

Timing: ours and the peer run interleaved (`time_interleaved`: ours, peer, ours, peer, ...)
for at least 3 rounds; records carry the median and spread of each side (`spread`) and of
the per-round ratio (`ratio_spread`).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Set by benchmarks.run for the scripts it starts: the 1-minute load average before the suite.
SUITE_LOAD_ENV = "RLVER_BENCH_SUITE_LOAD"


# ------------------------------------------------------------------------ environment
def machine_info() -> dict[str, Any]:
    """What the numbers depend on: cores, platform, library versions, accelerator kind."""
    import jax

    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
    }
    for name in ("flax", "torch", "transformers", "numpy"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other work on a shared box
    except OSError:
        pass
    suite_load = os.environ.get(SUITE_LOAD_ENV)
    if suite_load:
        # Inside a suite the previous benchmark's own work raises the load average; the
        # suite's load before it started anything is what says whether others were busy.
        info["suite_load_avg_1m_at_start"] = float(suite_load)
    return info


def start_load(machine: dict) -> float | None:
    """The load average a run started under: the suite's (when run by the suite), else the
    script's own at start."""
    load = machine.get("suite_load_avg_1m_at_start")
    return machine.get("load_avg_1m") if load is None else load


def core_count(machine: dict) -> int | None:
    return machine.get("usable_cpus") or machine.get("cpu_count")


def is_high_load(machine: dict) -> bool:
    """A run that started while more threads were runnable than there are cores: both
    sides of every comparison shared the machine with other work, so its numbers are
    kept (flagged) but do not update "where we stand"."""
    load, cores = start_load(machine), core_count(machine)
    return load is not None and cores is not None and load > cores


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def device_memory_bytes() -> int | None:
    """Peak bytes in use on the first accelerator, when the backend reports it (not CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))


def peer_name() -> str:
    import torch
    import transformers
    return f"transformers-{transformers.__version__}/torch-{torch.__version__}"


def append_results(name: str, records: Sequence[dict], results_dir: str | None = None) -> str:
    """Appends records as JSON lines to `<results_dir>/<name>.jsonl`; returns the path."""
    results_dir = results_dir or RESULTS_DIR
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{name}.jsonl")
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")
    return path


def base_record(benchmark: str, config: dict, machine: dict) -> dict[str, Any]:
    return {
        "benchmark": benchmark,
        "config": config,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        # Load at the run's start is in `machine`; this is the load when this record was
        # made, i.e. at the end of its measurement.
        "load_avg_1m_at_end": load_average(),
        "high_load": is_high_load(machine),
        "peak_rss_bytes": peak_rss_bytes(),
        "device_memory_bytes": device_memory_bytes(),
    }


# ---------------------------------------------------------------------------- timing
def median_time(fn: Callable[[], Any], repeats: int, min_seconds: float = 0.0) -> float:
    """Median wall time of `fn()` over `repeats` runs (more while under `min_seconds`).

    `fn` must block until its result is ready (call `jax.block_until_ready` inside).
    """
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds
                                   and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleave_order(names: Sequence[str], repeats: int) -> list[str]:
    """The call order of an interleaved measurement: every variant once per repeat, in the
    given order (ours, peer, ours, peer, ...), so that a change of machine load during the
    run hits both sides alike instead of whichever happened to run second."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    return [name for _ in range(repeats) for name in names]


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Wall times of each warm `fn()` over `repeats` interleaved rounds: {name: [seconds]}.

    Every `fn` must already be warm (compiled, allocated) and must block until its result
    is ready (`jax.block_until_ready`, `torch.cuda.synchronize`).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name in interleave_order(list(fns), repeats):
        t0 = clock()
        fns[name]()
        times[name].append(clock() - t0)
    return times


def spread(times: Sequence[float]) -> dict[str, Any]:
    """Median, min / max and quartiles (inclusive method) of a list of seconds."""
    if not times:
        raise ValueError("spread of no measurements")
    xs = sorted(float(t) for t in times)
    q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 \
        else (xs[0], xs[0], xs[0])
    return {"median_s": statistics.median(xs), "min_s": xs[0], "max_s": xs[-1],
            "q1_s": q1, "q3_s": q3, "n": len(xs), "times_s": [float(t) for t in times]}


def ratio_spread(ours_s: Sequence[float], peer_s: Sequence[float]) -> dict[str, Any]:
    """Speed ratio ours / peer (= peer time / our time) from interleaved rounds: the ratio of
    the medians, and the min / max of the per-round ratios (round i pairs ours[i] and
    peer[i], measured back to back under the same load)."""
    if len(ours_s) != len(peer_s) or not ours_s:
        raise ValueError(f"ratio_spread needs paired rounds, got {len(ours_s)} and "
                         f"{len(peer_s)} times")
    per_round = [p / o for o, p in zip(ours_s, peer_s)]
    return {"ratio": statistics.median(peer_s) / statistics.median(ours_s),
            "ratio_min": min(per_round), "ratio_max": max(per_round),
            "ratio_per_round": per_round}


MIN_REPEATS = 3  # interleaved rounds: fewer gives no spread worth the name


def check_repeats(parser, repeats: int, minimum: int = MIN_REPEATS) -> None:
    """A parser error (one line, exit 2) for fewer interleaved rounds than `minimum`."""
    if repeats < minimum:
        parser.error(f"--repeats {repeats}: at least {minimum} interleaved rounds are needed "
                     "for a median and a spread")


def timing_fields(times: dict[str, list[float]], ours: str = "ours",
                  peer: str = "peer") -> dict[str, Any]:
    """Record fields from `time_interleaved`'s result: `timing` (spread per side) and, with
    a peer, `ratio` (ours / peer speed, from the medians), `ratio_min`, `ratio_max`."""
    out: dict[str, Any] = {"timing": {name: spread(ts) for name, ts in times.items()}}
    if peer in times:
        out.update(ratio_spread(times[ours], times[peer]))
    return out


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def configure_torch_threads(threads: int | None) -> int:
    """torch intra-op threads: all usable cores by default, as XLA's CPU backend uses."""
    import torch

    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count()
    torch.set_num_threads(int(threads))
    return int(threads)


# ------------------------------------------------------------------------ twin models
def machine_and_twin_models(args) -> tuple[dict, Any, Any, Any]:
    """(machine info, config, our model, transformers peer or None) for a benchmark whose
    `--peer transformers` compares against torch: the peer's threads are set and recorded
    in the machine info before it is built."""
    machine = machine_info()
    with_peer = args.peer == "transformers"
    if with_peer:
        machine["torch_threads"] = configure_torch_threads(args.torch_threads)
    config, model, peer = build_twin_models(args.preset, dtype=args.dtype,
                                            with_peer=with_peer)
    return machine, config, model, peer


def build_twin_models(preset: str, *, dtype: str = "float32", seed: int = 0,
                      with_peer: bool = True, workdir: str | None = None):
    """Our model and transformers' Qwen2ForCausalLM with identical random weights.

    The torch model is built by transformers from our config (`Qwen2Config.to_hf_dict`),
    saved, and read back with `load_hf`, so both sides hold the same numbers. Without a
    peer (big presets on an accelerator) our model is initialised directly.
    Returns (config, our model, torch model or None).
    """
    from rlver_jax.models import create_model, get_preset, load_hf

    config = get_preset(preset, param_dtype=dtype, dtype=dtype)
    if not with_peer:
        return config, create_model(config, seed), None

    import torch
    from transformers import Qwen2Config as HFQwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    hf = config.to_hf_dict(dtype="float32")
    hf = {k: v for k, v in hf.items() if k not in ("architectures", "model_type")}
    peer = Qwen2ForCausalLM(HFQwen2Config(**hf)).eval()
    torch_dtype = getattr(torch, dtype)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        peer.to(torch_dtype).save_pretrained(tmp)
        loaded_config, model = load_hf(tmp, dtype=dtype)
    # load_hf reads ids and dtypes from config.json; keep the preset's numerics.
    assert loaded_config.num_layers == config.num_layers
    return loaded_config, model, peer


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    # Ids away from 0 so that no prompt collides with a pad or special id.
    return rng.integers(3, vocab, size=(batch, length)).tolist()


# ------------------------------------------------------------------- roofline probes
def measure_memory_bandwidth(nbytes: int = 256 * 1024**2, repeats: int = 5) -> float:
    """Bytes/s of a large device copy (read + write counted), with JAX on the default device."""
    import jax
    import jax.numpy as jnp

    n = nbytes // 4
    x = jnp.ones((n,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0001)  # a real read and write, not an aliasing no-op
    jax.block_until_ready(copy(x))
    t = median_time(lambda: jax.block_until_ready(copy(x)), repeats)
    return 2 * n * 4 / t


def _measure_read_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s of a float32 matrix-vector product over `nbytes` (each byte read once)."""
    import jax
    import jax.numpy as jnp

    matrix = jnp.ones((nbytes // 4 // 1024, 1024), jnp.float32)
    vector = jnp.ones((1024,), jnp.float32)
    gemv = jax.jit(lambda m, v: m @ v)
    jax.block_until_ready(gemv(matrix, vector))
    return matrix.nbytes / median_time(lambda: jax.block_until_ready(gemv(matrix, vector)),
                                       repeats)


def measure_bandwidths(nbytes: int = 256 * 1024**2, repeats: int = 5) -> dict[str, float]:
    """Every bandwidth probe (bytes/s) and `bandwidth_bytes_per_s`, the fastest of them,
    which the rooflines use: a JAX copy (read + write), a read-only JAX matrix-vector
    product over `nbytes` of float32 (what a decode step does to its weights), and on CPU a
    NumPy copy. Every probe spans `nbytes`, well past the caches: a 64 MB copy read as
    low as 12 GB/s on a machine whose 256 MB copy gave 27."""
    import jax
    import numpy as np

    rates = {"bandwidth_jax_bytes_per_s": measure_memory_bandwidth(nbytes, repeats),
             "bandwidth_jax_read_bytes_per_s": _measure_read_bandwidth(nbytes, repeats)}
    if jax.default_backend() == "cpu":
        src = np.ones(nbytes // 8)
        dst = np.empty_like(src)
        t = median_time(lambda: np.copyto(dst, src), repeats)
        rates["bandwidth_numpy_bytes_per_s"] = 2 * src.nbytes / t
    rates["bandwidth_bytes_per_s"] = max(rates.values())
    return rates


def measure_matmul_flops(size: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """FLOP/s of a square jnp.dot on the default device."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((size, size), dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b))
    jax.block_until_ready(dot(a, a))
    t = median_time(lambda: jax.block_until_ready(dot(a, a)), repeats)
    return 2 * size**3 / t


def weight_bytes(model) -> int:
    """Bytes of all parameters (each read once per decode step)."""
    import jax
    from flax import nnx

    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in leaves))


def fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f}"
