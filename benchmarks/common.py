"""Shared pieces of the benchmarks: machine info, result files, twin models, roofline probes.

Every benchmark appends one JSON object per measured configuration to
`benchmarks/results/<name>.jsonl` with at least: `benchmark`, `config` (preset, batch,
prompt length, new tokens, dtype), `peer`, `tokens_per_s`, `peer_tokens_per_s`, `ratio`
(ours / peer), `compile_s`, `peak_rss_bytes`, `device_memory_bytes` (None on CPU) and
`machine`.
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
    return info


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
