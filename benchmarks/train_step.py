"""Update-step throughput: our jitted policy step vs torch forward + backward, same batch.

    python -m benchmarks.train_step --quick        # small-100m, batch 2, T 128/512, 3 rounds
    python -m benchmarks.train_step --preset small-100m --batch 8 --length 128 256 512 1024 2048
    python -m benchmarks.train_step --preset qwen2.5-7b --dtype bfloat16 --peer none   # a GPU
    # float32 masters + bf16 compute (the trainer's default numerics) beside all-float32:
    python -m benchmarks.train_step --preset small-100m --batch 2 --length 128 512 \
        --dtype float32 bfloat16 --param_dtype float32

Ours: `rlver_jax.rl.update.Updater.step` with the policy settings the trainer uses (PPO
clipped-ratio loss over chunked LM-head log-probs, entropy metric, gradient clipping, AdamW
update, state donated), on a [B, T] batch of random tokens with every target position in the
loss. Peer: transformers' `Qwen2ForCausalLM` with the same weights (see
`common.build_twin_models`), `model(ids, labels=ids).loss.backward()` (mean token
cross-entropy over the same B x (T - 1) targets). The peer's ratio basis is forward +
backward only; its AdamW step is timed separately (`peer_optimizer_s`) and reported as
`peer_with_optimizer_tokens_per_s`, so our number (which includes the optimiser) is compared
against the cheaper torch program: the ratio is conservative.

Numerics: `--dtype` lists compute dtypes and `--param_dtype` the master-weight dtype (default:
each row's compute dtype). With `--param_dtype float32 --dtype float32 bfloat16` the rows
are all-float32 and float32 masters + bf16 compute (Adam moments and gradients follow the
masters: float32); every numerics' step (and its peer) runs in the same interleaved rounds.
The peer runs its float32 model under `torch.autocast(bfloat16)` (AMP, torch's counterpart
of the same numerics) for the mixed rows.

Reported per configuration:
  tokens_per_s / peer_tokens_per_s   B * T / median warm step time; `ratio` = ours / peer;
                                     ours and the peer's forward + backward run interleaved
                                     (ours, peer, ours, ...) for `--repeats` rounds: `timing`
                                     holds each side's spread, `ratio_min` / `ratio_max` the
                                     rounds'.
  compile_s                          first call's extra time (trace + XLA compile).
  memory                             our compiled program's argument / output / temp bytes
                                     (XLA memory analysis); peak RSS of the process (CPU) or
                                     peak device memory (accelerators, both sides).
  roofline                           analytic FLOPs per step, 6 * N * tokens + 12 * L * H * Dh
                                     * T * tokens (N: parameters doing matmuls; attention
                                     counted un-masked, as in PaLM's MFU); achieved FLOP/s;
                                     `roofline_fraction` = achieved / measured matmul rate on
                                     this device; `mfu` = achieved / the accelerator's
                                     published dense peak (None on CPU).

`plot(records, path)` draws step time vs sequence length (benchmarks/results/
update_vs_length.png).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

from benchmarks import common
from benchmarks.rl_step import CompileCounter

PLOT_NAME = "update_vs_length.png"

# Published dense peak FLOP/s per chip (bfloat16; float32 runs on GPUs use TF32 tensor cores
# when XLA picks them, so the bf16 peak is the honest denominator for both).
PEAK_FLOPS = {
    "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12,
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", nargs="+", default=["tiny", "small-100m"],
                   help="tiny / small-100m on CPU; qwen2.5-0.5b ... qwen2.5-7b on GPUs")
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=("float32", "bfloat16"),
                   help="compute dtypes (one row each)")
    p.add_argument("--param_dtype", default=None, choices=("float32", "bfloat16"),
                   help="master-weight dtype (default: each row's compute dtype)")
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--length", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (>= 3)")
    p.add_argument("--logprob_chunk", type=int, default=1024,
                   help="UpdateSettings.logprob_chunk (LM-head chunk length)")
    p.add_argument("--remat", default="none", help="model remat policy (none/full/dots)")
    p.add_argument("--peer", default="transformers", choices=("transformers", "none"))
    p.add_argument("--torch_threads", type=int, default=None)
    p.add_argument("--quick", action="store_true",
                   help="small-100m, batch 2, lengths 128/512, 3 rounds")
    p.add_argument("--results_dir", default=None)
    p.add_argument("--plot", default=None,
                   help=f"PNG path (default: <results_dir>/{PLOT_NAME}; 'none' to skip)")
    p.add_argument("--no_save", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        # small-100m only: tiny's step is all overhead, and every new shape costs a compile.
        # 128 and 512 (the target length): each length is one more ~30 s compile.
        args.preset, args.batch, args.length, args.repeats = (["small-100m"], [2],
                                                              [128, 512], 3)
    common.check_repeats(p, args.repeats)
    return args


# ------------------------------------------------------------------------ FLOPs, peaks
def step_flops(config, batch: int, length: int) -> float:
    """Analytic training FLOPs of one forward + backward over [batch, length] tokens."""
    from rlver_jax.models import count_params

    params = count_params(config)
    # The embedding lookup does no matmul; a tied embedding still does the LM head's.
    matmul_params = params - (0 if config.tie_word_embeddings
                              else config.vocab_size * config.hidden_size)
    tokens = batch * length
    attention = 12 * config.num_layers * config.num_heads * config.resolved_head_dim * length
    return float(tokens * (6 * matmul_params + attention))


def peak_flops(device_kind: str) -> float | None:
    """The accelerator's published dense peak, matched on its device_kind; None if unknown."""
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in device_kind.lower():
            return flops
    return None


@functools.cache
def matmul_rate(dtype: str) -> float:
    """Measured square-matmul FLOP/s on the default device (once per process and dtype)."""
    return common.measure_matmul_flops(dtype=dtype)


# ------------------------------------------------------------------------------ ours
def _train_batch(tokens):
    """A TrainBatch where every target position counts, with non-trivial advantages."""
    import jax.numpy as jnp

    from rlver_jax.rl.update import TrainBatch

    b, t = tokens.shape
    ones = jnp.ones((b, t), jnp.int32)
    loss_mask = ones.at[:, 0].set(0)  # column 0 has no context: no target, as in torch
    zeros = jnp.zeros((b, t), jnp.float32)
    # Alternating-sign advantages so that neither clip branch is constant.
    adv = jnp.where(jnp.arange(t)[None, :] % 2 == 0, 1.0, -1.0) * jnp.ones((b, 1))
    return TrainBatch(tokens=tokens, attention_mask=ones, loss_mask=loss_mask,
                      old_logp=zeros - 5.0, ref_logp=zeros, advantages=adv.astype(jnp.float32),
                      returns=zeros, old_values=zeros)


def _memory_analysis(updater, state, batch) -> dict | None:
    """Bytes of the compiled step's arguments / outputs / temporaries (XLA's analysis)."""
    try:
        compiled = updater._step.lower(state, batch).compile()  # noqa: SLF001 (benchmark)
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001: backends may not implement the analysis
        return None
    if ma is None:
        return None
    return {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0)
            for k in ("argument", "output", "temp", "generated_code", "alias")}


def _ours_step(updater, state, batch):
    """(first call s, warm step fn, holder of the current state). The step donates its
    state: `holder[0]` is the live one after any call."""
    import jax

    # Commit the state to its devices: a fresh (uncommitted) state and the step's committed
    # output state key different executables, so the second call would compile again.
    holder = [jax.device_put(state, jax.tree.map(lambda x: x.sharding, state))]

    def step():
        holder[0], metrics = updater.step(holder[0], batch)
        jax.block_until_ready((holder[0].params, metrics))
        return metrics

    t0 = time.perf_counter()
    metrics = step()
    first = time.perf_counter() - t0
    if not all(bool(jax.numpy.isfinite(v)) for v in jax.tree.leaves(metrics)):
        raise RuntimeError(f"non-finite update metrics: {metrics}")
    return first, step, holder


# ------------------------------------------------------------------------------ peer
def _peer_device():
    import torch
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peer_calls(peer, ids_np, autocast_dtype: str | None = None):
    """(warm forward + backward fn, sync) of the torch twin; `autocast_dtype`: computed
    under `torch.autocast` (AMP) in that dtype."""
    import contextlib

    import numpy as np
    import torch

    device = _peer_device()
    ids = torch.from_numpy(ids_np.astype(np.int64)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp = (functools.partial(torch.autocast, device_type=device.type,
                             dtype=getattr(torch, autocast_dtype))
           if autocast_dtype else contextlib.nullcontext)

    def fwd_bwd():
        peer.zero_grad(set_to_none=True)
        with amp():
            loss = peer(ids, labels=ids).loss  # mean CE over the B x (T - 1) shifted targets
        loss.backward()
        sync()
        return loss

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss = fwd_bwd()  # warm-up: allocator, oneDNN primitive caches
    if not torch.isfinite(loss):
        raise RuntimeError("peer loss is not finite")
    return fwd_bwd, sync


def _time_peer_optimizer(peer, sync, repeats) -> dict:
    """Median AdamW step s (after a forward + backward left gradients) and peak CUDA bytes."""
    import torch

    # Learning rate 0: the weights stay those of our twin for the next configuration.
    opt = torch.optim.AdamW(peer.parameters(), lr=0.0)

    def opt_step():
        opt.step()
        sync()

    opt_step()  # allocates the moments
    t_opt = common.median_time(opt_step, max(repeats, 2))
    peer.zero_grad(set_to_none=True)
    device = _peer_device()
    mem = int(torch.cuda.max_memory_allocated()) if device.type == "cuda" else None
    return {"optimizer_s": t_opt, "device_memory_bytes": mem}


# ------------------------------------------------------------------------------- run
def _with_numerics(model, param_dtype: str, dtype: str, remat: str):
    """The model with its weights stored in `param_dtype` and computing in `dtype`."""
    import jax
    from flax import nnx

    config = model.config.replace(param_dtype=param_dtype, dtype=dtype)
    if remat != "none":
        config = config.replace(remat=remat)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: type(model)(config,
                                                                      rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, jax.tree.map(lambda x, a: x.astype(a.dtype),
                                            nnx.state(model), abstract))


def _run_preset(args, preset: str, machine: dict) -> list[dict]:
    records = []
    # One twin per master dtype; its numerics (compute dtypes) share the timing rounds.
    for param_dtype in dict.fromkeys(args.param_dtype or d for d in args.dtype):
        dtypes = [d for d in args.dtype if (args.param_dtype or d) == param_dtype]
        records += _run_twin(args, preset, machine, param_dtype, dtypes)
    return records


def _run_twin(args, preset: str, machine: dict, param_dtype: str, dtypes: list[str]
              ) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rlver_jax.rl.update import UpdateSettings, Updater, make_optimizer

    with_peer = args.peer == "transformers"
    _, twin, peer = common.build_twin_models(preset, dtype=param_dtype, with_peer=with_peer)
    if peer is not None:
        peer = peer.train().to(_peer_device())
    settings = UpdateSettings(entropy_coef=0.0, logprob_chunk=args.logprob_chunk)
    updaters, states, configs = {}, {}, {}
    for dtype in dtypes:
        model = _with_numerics(twin, param_dtype, dtype, args.remat)
        configs[dtype] = model.config
        updaters[dtype] = Updater(model, make_optimizer(1e-6, 1000), settings)
        states[dtype] = updaters[dtype].init_state(model)
        del model
    del twin
    device_kind = machine["device_kind"]
    peak = peak_flops(device_kind) if machine["backend"] != "cpu" else None
    records = []
    for batch in args.batch:
        for length in args.length:
            vocab = configs[dtypes[0]].vocab_size
            ids = np.asarray(common.random_prompts(batch, length, vocab,
                                                   seed=batch * 131 + length), np.int32)
            train_batch = _train_batch(jnp.asarray(ids))
            fns, firsts, holders = {}, {}, {}
            for dtype in dtypes:
                firsts[dtype], fns[f"ours_{dtype}"], holders[dtype] = _ours_step(
                    updaters[dtype], states[dtype], train_batch)
                if peer is not None:
                    fns[f"peer_{dtype}"], sync = _peer_calls(
                        peer, ids, autocast_dtype=dtype if dtype != param_dtype else None)
            with CompileCounter() as compiles:
                # Interleaved rounds: ours (each numerics), peer (forward + backward), ...
                times = common.time_interleaved(fns, args.repeats)
            peer_opt = (_time_peer_optimizer(peer, sync, args.repeats) if peer is not None
                        else None)
            for dtype in dtypes:
                config, updater = configs[dtype], updaters[dtype]
                states[dtype] = holders[dtype][0]
                side = {"ours": times[f"ours_{dtype}"]}
                if peer is not None:
                    side["peer"] = times[f"peer_{dtype}"]
                t = statistics.median(side["ours"])
                memory = _memory_analysis(updater, states[dtype], train_batch)
                flops = step_flops(config, batch, length)
                achieved = flops / t
                measured = matmul_rate(dtype)
                record = common.base_record(
                    "train_step", {"preset": preset, "batch": batch, "prompt_len": length,
                                   "new_tokens": 0, "dtype": dtype, "param_dtype": param_dtype,
                                   "remat": args.remat, "logprob_chunk": args.logprob_chunk},
                    machine)
                record.update(
                    tokens_per_s=batch * length / t, step_s=t,
                    compile_s=max(firsts[dtype] - t, 0.0),
                    peer=None, peer_tokens_per_s=None, ratio=None, memory=memory,
                    compiles_while_timing=compiles.count,
                    roofline={"flops_per_step": flops, "achieved_flops_per_s": achieved,
                              "matmul_flops_per_s": measured,
                              "roofline_fraction": achieved / measured,
                              "peak_flops_per_s": peak,
                              "mfu": achieved / peak if peak else None})
                record.update(common.timing_fields(side))
                if peer is not None:
                    p = {"step_s": statistics.median(side["peer"]), **peer_opt}
                    record.update(
                        peer=common.peer_name(),
                        peer_tokens_per_s=batch * length / p["step_s"],
                        peer_step_s=p["step_s"], peer_optimizer_s=p["optimizer_s"],
                        peer_with_optimizer_tokens_per_s=batch * length
                        / (p["step_s"] + p["optimizer_s"]),
                        peer_device_memory_bytes=p["device_memory_bytes"],
                        ratio_with_optimizer=(p["step_s"] + p["optimizer_s"]) / t)
                record["peak_rss_bytes"] = common.peak_rss_bytes()
                record["device_memory_bytes"] = common.device_memory_bytes()
                print(f"train_step {preset} B={batch} T={length} {param_dtype} masters, "
                      f"{dtype} compute: {common.fmt_rate(record['tokens_per_s'])} tok/s "
                      f"({t:.3f} s), peer {common.fmt_rate(record['peer_tokens_per_s'])} "
                      f"tok/s, ratio {record['ratio'] or float('nan'):.2f}, "
                      f"{achieved / 1e9:.1f} GFLOP/s ({achieved / measured:.0%} of matmul "
                      f"rate), compile {record['compile_s']:.1f}s", flush=True)
                records.append(record)
    del states, updaters, holders, peer
    jax.clear_caches()
    return records


def run(args: argparse.Namespace) -> list[dict]:
    """Measures every (preset, batch, length); returns (and unless --no_save appends) records."""
    machine = common.machine_info()
    if args.peer == "transformers":
        machine["torch_threads"] = common.configure_torch_threads(args.torch_threads)
    records = []
    for preset in args.preset:
        records += _run_preset(args, preset, machine)
    if not args.no_save:
        common.append_results("train_step", records, args.results_dir)
    if args.plot != "none" and records:
        path = args.plot or os.path.join(args.results_dir or common.RESULTS_DIR, PLOT_NAME)
        plot(records, path)
    return records


def plot(records: list[dict], path: str) -> str:
    """Update step time vs sequence length, ours and the peer, one panel per preset."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    presets = sorted({r["config"]["preset"] for r in records})
    fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 3.8), squeeze=False)
    for ax, preset in zip(axes[0], presets):
        rows = [r for r in records if r["config"]["preset"] == preset]
        for batch in sorted({r["config"]["batch"] for r in rows}):
            sel = sorted((r for r in rows if r["config"]["batch"] == batch),
                         key=lambda r: r["config"]["prompt_len"])
            lengths = [r["config"]["prompt_len"] for r in sel]
            ax.plot(lengths, [r["step_s"] for r in sel], "o-", label=f"ours B={batch}")
            if any(r.get("peer_step_s") for r in sel):
                ax.plot(lengths, [r.get("peer_step_s") for r in sel], "s--",
                        label=f"torch fwd+bwd B={batch}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel("update step time (s)")
        m = rows[0]["machine"]
        ax.set_title(f"{preset} {rows[0]['config']['dtype']} on {m['device_kind']}"
                     f" x{m.get('usable_cpus', '?') if m['backend'] == 'cpu' else ''}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
