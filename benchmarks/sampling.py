"""Decode throughput of `rlver_jax.sampling.Sampler` vs transformers' `generate`, with a roofline.

    python -m benchmarks.sampling --quick                      # < 3 min on 2 CPU cores
    python -m benchmarks.sampling --preset small-100m          # batch 1/8/32/64 x prompt 128/512
    python -m benchmarks.sampling --preset qwen2.5-7b --dtype bfloat16 --peer none   # a GPU

Both sides decode greedily from the same weights and prompts, exactly `--new_tokens` tokens
(no stop tokens for us, `min_new_tokens=max_new_tokens` for transformers).

Reported per configuration:
  tokens_per_s / peer_tokens_per_s   B * N / median wall time of a whole warm generate call
                                     (prefill + decode), compile excluded; `ratio` = ours/peer;
                                     ours and the peer run interleaved (ours, peer, ours, ...)
                                     for `--repeats` rounds: `timing` / `prefill_timing` hold
                                     each side's spread, `ratio_min` / `ratio_max` the rounds'.
  decode_tokens_per_s (+ peer_)      B * N / (generate time - prefill time).
  compile_s                          first call's extra time (prefill + decode programs).
  roofline                           per decode step, ideal time = max(bytes / bandwidth,
                                     flops / matmul rate) with bytes = all weights + the KV
                                     cache actually filled (prompt + N/2 on average), both
                                     rates measured in this script; `roofline_fraction` =
                                     ideal / achieved step time (1.0 is the roofline).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

from benchmarks import common


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-100m",
                   help="tiny / small-100m on CPU; qwen2.5-0.5b ... qwen2.5-7b on GPUs")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--prompt_len", type=int, nargs="+", default=[128, 512])
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (>= 3)")
    p.add_argument("--peer", default="transformers", choices=("transformers", "none"))
    p.add_argument("--torch_threads", type=int, default=None)
    p.add_argument("--decode_layers", default="auto", choices=("auto", "scan", "unrolled"),
                   help="Sampler(decode_layers=...): the layer scan or per-layer weights")
    p.add_argument("--quick", action="store_true",
                   help="batch 1 and 8, prompt 128, 16 new tokens, 3 rounds")
    p.add_argument("--results_dir", default=None)
    p.add_argument("--no_save", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.prompt_len, args.new_tokens, args.repeats = [1, 8], [128], 16, 3
    common.check_repeats(p, args.repeats)
    return args


@functools.cache
def _rates() -> dict[str, float]:
    """Measured once per process: memory bandwidth (`common.measure_bandwidths`) and matmul."""
    return {**common.measure_bandwidths(), "matmul_flops_per_s": common.measure_matmul_flops()}


def roofline(config, model, batch: int, prompt_len: int, new_tokens: int,
             step_s: float) -> dict[str, float]:
    """Ideal time of one decode step from the measured rates, and how close we are."""
    from rlver_jax.models import count_params

    rates = _rates()
    itemsize = config.jnp_dtype.itemsize
    w_bytes = common.weight_bytes(model)
    filled = prompt_len + new_tokens / 2  # average number of cached tokens during decode
    kv_bytes = (2 * config.num_layers * batch * filled * config.num_kv_heads
                * config.resolved_head_dim * itemsize)
    params = count_params(config)
    matmul_params = params - (0 if config.tie_word_embeddings
                              else config.vocab_size * config.hidden_size)
    attn_flops = 4 * config.num_layers * batch * filled * config.num_heads * \
        config.resolved_head_dim
    flops = 2 * batch * matmul_params + attn_flops
    memory_s = (w_bytes + kv_bytes) / rates["bandwidth_bytes_per_s"]
    compute_s = flops / rates["matmul_flops_per_s"]
    ideal = max(memory_s, compute_s)
    return {**rates, "weight_bytes": w_bytes, "kv_bytes_per_step": kv_bytes,
            "flops_per_step": flops, "ideal_memory_step_s": memory_s,
            "ideal_compute_step_s": compute_s, "ideal_step_s": ideal,
            "achieved_step_s": step_s, "roofline_fraction": ideal / step_s,
            "bound": "memory" if memory_s >= compute_s else "compute"}


def _ours_calls(sampler, model, prompts, new_tokens):
    """(first call s, warm generate fn, warm prefill fn) of our sampler; both fns block."""
    import jax
    import numpy as np
    from flax import nnx

    from rlver_jax.sampling.continuation import capacity_bucket, next_power_of_two

    t0 = time.perf_counter()
    out = sampler.generate(model, prompts, new_tokens)
    first = time.perf_counter() - t0
    assert all(len(t) == new_tokens for t in out.tokens), "a row stopped early"

    def generate():
        # generate() returns host lists, so it has waited for the device.
        sampler.generate(model, prompts, new_tokens)

    # The prefill alone, with the very shapes (already compiled) that generate uses.
    batch = next_power_of_two(len(prompts))
    width = next_power_of_two(max(map(len, prompts)), sampler.min_prompt_bucket)
    capacity = capacity_bucket(width + next_power_of_two(new_tokens),
                               sampler.capacity_buckets_per_octave)
    tokens = np.zeros((batch, width), np.int32)
    tokens[:len(prompts), width - len(prompts[0]):] = prompts
    mask = tokens != 0
    mask[len(prompts):, -1] = True
    weights = nnx.state(model)
    tokens_j, mask_j = sampler._place(tokens), sampler._place(mask)

    def prefill():
        cache = sampler._new_cache(batch, capacity)
        jax.block_until_ready(sampler._prefill(weights, cache, tokens_j, mask_j))

    before = sampler.num_compilations
    prefill()
    if sampler.num_compilations != before:
        raise RuntimeError("prefill timing recompiled: shapes differ from generate's")
    return first, generate, prefill


def _peer_calls(peer, prompts, new_tokens):
    """(warm generate fn, warm prefill fn) of transformers' greedy generate."""
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens, pad_token_id=0, top_k=None, top_p=None,
                  temperature=None)

    def generate():
        with torch.no_grad():
            out = peer.generate(ids, **kwargs)
        assert out.shape[1] == ids.shape[1] + new_tokens

    def prefill():
        with torch.no_grad():
            peer(ids, attention_mask=mask, use_cache=True)

    with torch.no_grad():
        peer.generate(ids, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    prefill()
    return generate, prefill


def run(args: argparse.Namespace) -> list[dict]:
    """Measures every (batch, prompt length); returns (and unless --no_save appends) records."""
    from rlver_jax.sampling import Sampler

    machine, config, model, peer = common.machine_and_twin_models(args)
    sampler = Sampler(model, decode_layers=args.decode_layers)
    n = args.new_tokens
    records = []
    for prompt_len in args.prompt_len:
        for batch in args.batch:
            prompts = common.random_prompts(batch, prompt_len, config.vocab_size,
                                            seed=batch * 7919 + prompt_len)
            first, generate, prefill = _ours_calls(sampler, model, prompts, n)
            generates, prefills = {"ours": generate}, {"ours": prefill}
            if peer is not None:
                generates["peer"], prefills["peer"] = _peer_calls(peer, prompts, n)
            # Interleaved rounds (ours, peer, ours, ...): whole generate calls, then prefills.
            times = common.time_interleaved(generates, args.repeats)
            prefill_times = common.time_interleaved(prefills, args.repeats)
            total = statistics.median(times["ours"])
            prefill_s = statistics.median(prefill_times["ours"])
            step_s = (total - prefill_s) / n
            record = common.base_record(
                "sampling", {"preset": args.preset, "batch": batch, "prompt_len": prompt_len,
                             "new_tokens": n, "dtype": args.dtype, "greedy": True}, machine)
            record.update(
                tokens_per_s=batch * n / total, decode_tokens_per_s=batch * n / (total - prefill_s),
                generate_s=total, prefill_s=prefill_s, compile_s=max(first - total, 0.0),
                peer=None, peer_tokens_per_s=None, peer_decode_tokens_per_s=None, ratio=None,
                decode_ratio=None, compilations=sampler.num_compilations,
                decode_layers="unrolled" if sampler.unrolled_decode else "scan",
                roofline=roofline(config, model, batch, prompt_len, n, step_s))
            record.update(common.timing_fields(times))
            record["prefill_timing"] = common.timing_fields(prefill_times)["timing"]
            if peer is not None:
                p_total = statistics.median(times["peer"])
                p_prefill = statistics.median(prefill_times["peer"])
                record.update(
                    peer=common.peer_name(), peer_tokens_per_s=batch * n / p_total,
                    peer_decode_tokens_per_s=batch * n / max(p_total - p_prefill, 1e-9),
                    peer_generate_s=p_total, peer_prefill_s=p_prefill,
                    decode_ratio=max(p_total - p_prefill, 1e-9) / (total - prefill_s))
            record["peak_rss_bytes"] = common.peak_rss_bytes()
            record["device_memory_bytes"] = common.device_memory_bytes()
            roof = record["roofline"]
            print(f"sampling {args.preset} B={batch} P={prompt_len} N={n}: "
                  f"{common.fmt_rate(record['tokens_per_s'])} tok/s "
                  f"(decode {common.fmt_rate(record['decode_tokens_per_s'])}), peer "
                  f"{common.fmt_rate(record['peer_tokens_per_s'])} "
                  f"(decode {common.fmt_rate(record['peer_decode_tokens_per_s'])}), "
                  f"ratio {record['ratio'] or float('nan'):.2f}, step "
                  f"{step_s * 1e3:.2f} ms vs ideal {roof['ideal_step_s'] * 1e3:.2f} ms "
                  f"({roof['roofline_fraction']:.0%}), compile {record['compile_s']:.1f}s",
                  flush=True)
            records.append(record)
    if not args.no_save:
        common.append_results("sampling", records, args.results_dir)
    return records


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
