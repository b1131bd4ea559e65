"""Prefill throughput: one forward pass over [B, T] tokens, ours (jitted) vs transformers.

    python -m benchmarks.forward --preset small-100m --batch 8 --length 128
    python -m benchmarks.forward --quick

Both sides hold the same random weights (see `common.build_twin_models`) and compute the
full [B, T, V] float32 logits, interleaved (ours, peer, ours, ...) for `--repeats` rounds
(at least 3). tokens/s = B * T / median wall time of a warm call; `timing` holds each
side's spread and `ratio_min` / `ratio_max` the per-round ratios; compile_s is the first
call's extra time (trace + XLA compile).
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks import common


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-100m")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--length", type=int, nargs="+", default=[128, 512])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peer", default="transformers", choices=("transformers", "none"))
    p.add_argument("--torch_threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="one small configuration")
    p.add_argument("--results_dir", default=None)
    p.add_argument("--no_save", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.length, args.repeats = [8], [128], 3
    common.check_repeats(p, args.repeats)
    return args


def run(args: argparse.Namespace) -> list[dict]:
    """Measures every (batch, length) pair; returns (and unless --no_save appends) records."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    machine, config, model, peer = common.machine_and_twin_models(args)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    records = []
    for batch in args.batch:
        for length in args.length:
            ids = np.asarray(common.random_prompts(batch, length, config.vocab_size), np.int32)
            ids_j = jnp.asarray(ids)
            t0 = time.perf_counter()
            jax.block_until_ready(forward(state, ids_j))
            first = time.perf_counter() - t0
            fns = {"ours": lambda: jax.block_until_ready(forward(state, ids_j))}
            if peer is not None:
                import torch
                ids_t = torch.from_numpy(ids.astype(np.int64))

                def peer_forward():
                    with torch.no_grad():
                        peer(ids_t)

                peer_forward()  # warm-up: allocator, oneDNN primitive caches
                fns["peer"] = peer_forward
            times = common.time_interleaved(fns, args.repeats)
            t = statistics.median(times["ours"])
            record = common.base_record(
                "forward", {"preset": args.preset, "batch": batch, "prompt_len": length,
                            "new_tokens": 0, "dtype": args.dtype}, machine)
            record.update(tokens_per_s=batch * length / t, step_s=t,
                          compile_s=max(first - t, 0.0), peer=None, peer_tokens_per_s=None,
                          ratio=None)
            record.update(common.timing_fields(times))
            if peer is not None:
                t_peer = statistics.median(times["peer"])
                record.update(peer=common.peer_name(), peer_tokens_per_s=batch * length / t_peer,
                              peer_step_s=t_peer)
                record["peak_rss_bytes"] = common.peak_rss_bytes()
            print(f"forward {args.preset} B={batch} T={length}: "
                  f"{common.fmt_rate(record['tokens_per_s'])} tok/s, peer "
                  f"{common.fmt_rate(record['peer_tokens_per_s'])} tok/s, "
                  f"compile {record['compile_s']:.1f}s", flush=True)
            records.append(record)
    if not args.no_save:
        common.append_results("forward", records, args.results_dir)
    return records


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
