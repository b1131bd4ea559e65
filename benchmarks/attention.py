"""The attention op alone: ours per implementation vs torch `scaled_dot_product_attention`.

    python -m benchmarks.attention --quick            # heads 7/1 x 64; T 1024 / 2048
    python -m benchmarks.attention                    # Qwen2.5-7B heads, T 512 ... 8192
    python -m benchmarks.attention --backward         # also forward + backward

The problem is a causal prefill over a slot cache with left padding: q [B, T, N, H] at
slots 0 .. T-1, k / v [B, S, K, H] with S = T slots, row b left-padded by
`round(b / (B - 1) * pad_fraction * T)` slots (row 0 unpadded), so rows have different
lengths. Key slot s is visible to query t iff `key_valid[b, s]` and `s <= t`.

Ours: every implementation of `rlver_jax.models.attention.dot_product_attention` (the
module's `IMPLEMENTATIONS`, or `--implementation`), each called with `key_valid` and
`query_slots` (and `causal_offset=0` where the entry point takes it) and jitted. One that
fails to compile or run on this backend, or whose
compiled program needs more than `--max_temp_bytes` of XLA temporaries, is recorded as
skipped with the reason. Until that module exists the script measures what the model uses
today: `rlver_jax.models.qwen2.attention` (the einsum over a prebuilt [B, T, S] mask,
`qwen2.attention`) and `jax.nn.dot_product_attention(implementation="xla")` (`jax.nn.xla`).

Peer: `torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=[B, 1, T, S]
bool, enable_gqa=True)` in torch's own [B, N, T, H] layout (GQA by `enable_gqa`: no
repeated K / V on our side of the call; torch may expand inside).

Per (length, heads, pass) every implementation and the peer run interleaved (impl 1,
impl 2, ..., peer, impl 1, ...) for `--repeats` rounds. Records (`results/attention.jsonl`),
one per implementation: `step_s` (median), `timing` (spread of ours and the peer),
`ratio` = peer median / ours (> 1: ours faster), `ratio_min` / `ratio_max` (per round),
`tokens_per_s` (B x T queries / s), `temp_bytes` (XLA `memory_analysis()` temporaries of
the compiled program), `compile_s`, `max_abs_err` vs the reference einsum on the rows'
real queries (and the peer's, `peer_max_abs_err`).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import statistics
import time
from typing import Any, Callable

from benchmarks import common

LEGACY = ("qwen2.attention", "jax.nn.xla")  # measured while models/attention.py is absent
REFERENCES = ("reference", "qwen2.attention")  # the einsum, under either name
# Quick: Qwen2.5's GQA ratio (7:1) with fewer, smaller heads, at the two lengths the target
# starts from; under a minute on 2 idle cores with today's two implementations (8:1 and the
# real head sizes are in the `targets` and `full` suites).
QUICK = dict(batch=2, length=[1024, 2048], heads=["7/1"], head_dim=64)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192],
                   help="query tokens T (= cache slots S)")
    p.add_argument("--heads", nargs="+", default=["28/4", "32/4"],
                   help="query/kv heads: 28/4 is Qwen2.5-7B (7:1), 32/4 is 8:1")
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--pad_fraction", type=float, default=0.25,
                   help="left padding of the last row, as a fraction of T")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--implementation", nargs="+", default=None,
                   help="ours to measure (default: all the attention module offers)")
    p.add_argument("--backward", action="store_true", help="also time forward + backward")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (>= 3)")
    p.add_argument("--max_temp_bytes", type=float, default=None,
                   help="skip programs needing more XLA temporaries (default: 1/4 of RAM)")
    p.add_argument("--peer", default="torch", choices=("torch", "none"))
    p.add_argument("--torch_threads", type=int, default=None)
    p.add_argument("--quick", action="store_true",
                   help="batch 2, T 1024 / 2048, heads 7/1 of dim 64, forward only, 3 rounds")
    p.add_argument("--results_dir", default=None)
    p.add_argument("--no_save", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.length = QUICK["batch"], QUICK["length"]
        args.heads, args.head_dim, args.backward = QUICK["heads"], QUICK["head_dim"], False
    common.check_repeats(p, args.repeats)
    try:
        args.heads = [tuple(int(x) for x in h.split("/")) for h in args.heads]
    except ValueError:
        p.error(f"--heads {args.heads}: expected QUERY/KV such as 28/4")
    for n, k in args.heads:
        if k < 1 or n % k:
            p.error(f"--heads {n}/{k}: query heads must be a multiple of kv heads")
    if args.batch < 1 or not 0 <= args.pad_fraction < 1:
        p.error("--batch must be >= 1 and --pad_fraction in [0, 1)")
    return args


# ------------------------------------------------------------------------ the problem
def problem(batch: int, length: int, heads: int, kv_heads: int, head_dim: int,
            pad_fraction: float, dtype: str, seed: int = 0) -> dict[str, Any]:
    """q, k, v, key_valid [B, S], query_slots [T], the [B, T, S] mask, a cotangent."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pads = [round(b / max(batch - 1, 1) * pad_fraction * length) for b in range(batch)]
    slots = np.arange(length)
    key_valid = slots[None, :] >= np.asarray(pads)[:, None]               # [B, S]
    query_slots = slots.astype(np.int32)                                  # [T]
    allowed = key_valid[:, None, :] & (slots[None, None, :] <= query_slots[None, :, None])
    shape_q, shape_kv = (batch, length, heads, head_dim), (batch, length, kv_heads, head_dim)
    return {"q": rng.standard_normal(shape_q, np.float32),
            "k": rng.standard_normal(shape_kv, np.float32),
            "v": rng.standard_normal(shape_kv, np.float32),
            "cotangent": rng.standard_normal(shape_q, np.float32),
            "key_valid": key_valid, "query_slots": query_slots, "allowed": allowed,
            "pads": pads, "dtype": dtype}


def real_queries(pads: list[int], length: int):
    """[B, T] bool: queries at real (unpadded) slots; padded ones see no key at all."""
    import numpy as np

    return np.arange(length)[None, :] >= np.asarray(pads)[:, None]


# ------------------------------------------------------------------------------ ours
def our_implementations(wanted: list[str] | None) -> tuple[dict[str, Callable], str]:
    """{name: fn(q, k, v, key_valid, query_slots, allowed) -> out} and where they come from.
    Imported lazily: the attention module may not exist in this checkout yet."""
    try:
        attention = importlib.import_module("rlver_jax.models.attention")
    except ImportError:
        attention = None
    if attention is not None:
        names = list(wanted or attention.IMPLEMENTATIONS)
        # The queries sit at slots 0 .. T-1: where the entry point takes that as a static
        # `causal_offset` (splash needs it; blockwise can skip blocks statically), say so.
        static = ({"causal_offset": 0} if "causal_offset" in
                  inspect.signature(attention.dot_product_attention).parameters else {})

        def make(name):
            return lambda q, k, v, key_valid, query_slots, allowed: \
                attention.dot_product_attention(q, k, v, key_valid=key_valid,
                                                query_slots=query_slots, implementation=name,
                                                **static)
        source = "rlver_jax.models.attention" + (" (causal_offset=0)" if static else "")
        return {name: make(name) for name in names}, source

    import jax

    from rlver_jax.models import qwen2

    legacy = {
        "qwen2.attention": lambda q, k, v, key_valid, query_slots, allowed:
            qwen2.attention(q, k, v, allowed),
        "jax.nn.xla": lambda q, k, v, key_valid, query_slots, allowed:
            jax.nn.dot_product_attention(q, k, v, mask=allowed[:, None],
                                         implementation="xla"),
    }
    names = [n for n in (wanted or LEGACY) if n in legacy]
    return {n: legacy[n] for n in names}, "legacy (rlver_jax.models.attention is absent)"


def _program(fn: Callable, backward: bool) -> Callable:
    """The jitted program timed: forward, or forward + backward (grads of <out, cot>)."""
    import jax
    import jax.numpy as jnp

    if not backward:
        return jax.jit(lambda q, k, v, kv, qs, al, cot: fn(q, k, v, kv, qs, al))

    def loss(q, k, v, kv, qs, al, cot):
        return jnp.sum(fn(q, k, v, kv, qs, al).astype(jnp.float32) * cot)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def compile_ours(fn: Callable, inputs: tuple, backward: bool, max_temp_bytes: float):
    """(compiled program, compile s, temp bytes) or raises `Skip` with the reason."""
    t0 = time.perf_counter()
    try:
        compiled = _program(fn, backward).lower(*inputs).compile()
    except Exception as e:  # noqa: BLE001: an implementation this backend does not serve
        raise Skip(f"does not compile here: {_first_line(e)}") from e
    compile_s = time.perf_counter() - t0
    temp = None
    try:
        analysis = compiled.memory_analysis()
        temp = int(analysis.temp_size_in_bytes) if analysis is not None else None
    except Exception:  # noqa: BLE001: not every backend implements the analysis
        pass
    if temp is not None and temp > max_temp_bytes:
        raise Skip(f"needs {_gib(temp)} of XLA temporaries (--max_temp_bytes "
                   f"{_gib(max_temp_bytes)})", temp, compile_s)
    return compiled, compile_s, temp


class Skip(Exception):
    def __init__(self, reason: str, temp_bytes: int | None = None,
                 compile_s: float | None = None):
        super().__init__(reason)
        self.reason, self.temp_bytes, self.compile_s = reason, temp_bytes, compile_s


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# ------------------------------------------------------------------------------ peer
def peer_call(prob: dict, backward: bool) -> tuple[Callable, Any]:
    """(warm blocking fn, its first output as numpy [B, T, N, H]) of torch SDPA."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, prob["dtype"])
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def to_torch(x):  # [B, T, N, H] -> torch's [B, N, T, H]
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1, 3))).to(
            device, dtype)

    q, k, v = (to_torch(prob[n]) for n in ("q", "k", "v"))
    cot = to_torch(prob["cotangent"])
    mask = torch.from_numpy(prob["allowed"][:, None]).to(device)
    for x in (q, k, v):
        x.requires_grad_(backward)

    def forward():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def call():
        if backward:
            for x in (q, k, v):
                x.grad = None
            forward().backward(cot)
        else:
            with torch.no_grad():
                forward()
        sync()

    with torch.no_grad():
        out = forward().float().cpu().numpy().transpose(0, 2, 1, 3)
    call()  # warm-up: allocator, kernel selection
    return call, out


def peer_name() -> str:
    import torch
    return f"torch-{torch.__version__} scaled_dot_product_attention (enable_gqa)"


# ------------------------------------------------------------------------------- run
def _max_abs_err(out, ref, real) -> float:
    import numpy as np

    diff = np.abs(np.asarray(out, np.float32) - np.asarray(ref, np.float32))
    return float(diff[real].max()) if real.any() else 0.0


def measure(args, machine: dict, length: int, heads: int, kv_heads: int, backward: bool,
            impls: dict[str, Callable], source: str) -> list[dict]:
    """Every implementation and the peer on one problem, interleaved; one record each."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlver_jax.models import qwen2

    prob = problem(args.batch, length, heads, kv_heads, args.head_dim, args.pad_fraction,
                   args.dtype)
    dtype = jnp.dtype(args.dtype)
    inputs = (jnp.asarray(prob["q"], dtype), jnp.asarray(prob["k"], dtype),
              jnp.asarray(prob["v"], dtype), jnp.asarray(prob["key_valid"]),
              jnp.asarray(prob["query_slots"]), jnp.asarray(prob["allowed"]),
              jnp.asarray(prob["cotangent"], jnp.float32))
    real = real_queries(prob["pads"], length)
    max_temp = args.max_temp_bytes or _default_max_temp()
    reference = None  # the einsum's output, for the error column (forward only)

    fns: dict[str, Callable] = {}
    results: dict[str, dict] = {}
    for name, fn in impls.items():
        try:
            compiled, compile_s, temp = compile_ours(fn, inputs, backward, max_temp)
            t0 = time.perf_counter()
            out = jax.block_until_ready(compiled(*inputs))
            first_run_s = time.perf_counter() - t0
        except Skip as e:
            results[name] = {"status": "skipped", "reason": e.reason, "temp_bytes": e.temp_bytes,
                             "compile_s": e.compile_s}
            print(f"attention {name} T={length} heads {heads}/{kv_heads} backward={backward}: "
                  f"skipped ({e.reason})", flush=True)
            continue
        except Exception as e:  # noqa: BLE001: fails at run time on this backend
            results[name] = {"status": "skipped", "reason": f"fails here: {_first_line(e)}"}
            print(f"attention {name} T={length} heads {heads}/{kv_heads} backward={backward}: "
                  f"skipped ({results[name]['reason']})", flush=True)
            continue
        fns[name] = lambda compiled=compiled: jax.block_until_ready(compiled(*inputs))
        results[name] = {"status": "ok", "compile_s": compile_s, "temp_bytes": temp,
                         "first_run_s": first_run_s,
                         "out": None if backward else np.asarray(out, np.float32)}
    for name in REFERENCES:  # the reference einsum measured already: its output serves
        if not backward and results.get(name, {}).get("status") == "ok":
            reference = results[name]["out"]
            break
    if reference is None and not backward and any(
            r["status"] == "ok" for r in results.values()):
        def einsum(q, k, v, kv, qs, al):
            return qwen2.attention(q, k, v, al)

        try:  # the [B, K, G, T, S] scores may not fit at the largest sizes: no error column
            compiled, _, _ = compile_ours(einsum, inputs, False, max_temp)
            reference = np.asarray(compiled(*inputs), np.float32)
        except Skip:
            reference = None
    peer_out = None
    if args.peer == "torch" and fns:
        fns["peer"], peer_out = peer_call(prob, backward)
    times = common.time_interleaved(fns, args.repeats) if fns else {}

    records = []
    for name, res in results.items():
        config = {"batch": args.batch, "length": length, "slots": length, "heads": heads,
                  "kv_heads": kv_heads, "group": heads // kv_heads, "head_dim": args.head_dim,
                  "dtype": args.dtype, "pad_fraction": args.pad_fraction,
                  "pass": "forward+backward" if backward else "forward",
                  "implementation": name}
        record = common.base_record("attention", config, machine)
        record.update(implementation_source=source, status=res["status"],
                      reason=res.get("reason"), temp_bytes=res.get("temp_bytes"),
                      compile_s=res.get("compile_s"), peer=None, tokens_per_s=None,
                      peer_tokens_per_s=None, ratio=None, step_s=None, peer_step_s=None,
                      max_abs_err=None, peer_max_abs_err=None)
        if res["status"] == "ok":
            t = statistics.median(times[name])
            side = {"ours": times[name], **({"peer": times["peer"]} if "peer" in times
                                             else {})}
            record.update(common.timing_fields(side))
            record.update(step_s=t, tokens_per_s=args.batch * length / t,
                          compile_s=max(res["compile_s"] + res["first_run_s"] - t, 0.0))
            if reference is not None and res["out"] is not None:
                record["max_abs_err"] = _max_abs_err(res["out"], reference, real)
            if "peer" in times:
                t_peer = statistics.median(times["peer"])
                record.update(peer=peer_name(), peer_step_s=t_peer,
                              peer_tokens_per_s=args.batch * length / t_peer)
                if reference is not None and peer_out is not None:
                    record["peer_max_abs_err"] = _max_abs_err(peer_out, reference, real)
        record["peak_rss_bytes"] = common.peak_rss_bytes()
        records.append(record)
        if res["status"] == "ok":
            print(f"attention {name} {record['config']['pass']} B={args.batch} T={length} "
                  f"heads {heads}/{kv_heads}x{args.head_dim}: {t * 1e3:.1f} ms"
                  + (f", peer {record['peer_step_s'] * 1e3:.1f} ms, ratio "
                     f"{record['ratio']:.2f}x [{record['ratio_min']:.2f}, "
                     f"{record['ratio_max']:.2f}]" if record["peer"] else "")
                  + f", XLA temp {_gib(record['temp_bytes'])}, max err "
                  f"{record['max_abs_err']}", flush=True)
    return records


def _gib(x) -> str:
    return "-" if x is None else f"{x / 2**30:.3f} GiB"


def _default_max_temp() -> float:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 4
    except (ValueError, OSError):
        return 8 * 2**30


def run(args: argparse.Namespace) -> list[dict]:
    """Measures every (heads, length, pass); returns (and unless --no_save appends) records."""
    machine = common.machine_info()
    if args.peer == "torch":
        machine["torch_threads"] = common.configure_torch_threads(args.torch_threads)
    impls, source = our_implementations(args.implementation)
    if not impls:
        raise SystemExit(f"--implementation {args.implementation}: none available "
                         f"({source})")
    print(f"attention: ours from {source}: {', '.join(impls)}", flush=True)
    records = []
    for heads, kv_heads in args.heads:
        for length in args.length:
            for backward in (False, True) if args.backward else (False,):
                records += measure(args, machine, length, heads, kv_heads, backward, impls,
                                   source)
    if not args.no_save:
        common.append_results("attention", records, args.results_dir)
    return records


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
