"""Optional peer: Tunix's JAX sampler (PyPI `google-tunix`) on the same weights and prompts.

    make bench-peers                                  # creates benchmarks/.venv-tunix
    python -m benchmarks.peers.tunix_sampler --quick  # batch 1 and 8, prompt 128, 16 tokens

Tunix pins `safetensors<0.8` (the project pins 0.8.0), so it lives in its own virtual
environment, `benchmarks/.venv-tunix`. This file has two roles:

  driver (project venv, `run(args)`): builds our model and transformers' twin with the same
    random weights (`common.build_twin_models`), saves the twin as an HF directory, times our
    `Sampler.generate` (greedy, exactly N new tokens) and then runs this file as a worker in
    the Tunix venv on the same directory and prompts;
  worker (`--worker`, Tunix venv): loads the directory with
    `tunix.models.qwen2.params.create_model_from_safe_tensors` and times
    `tunix.generate.sampler.Sampler(...)(prompts, max_generation_steps=N)` in greedy mode,
    printing one JSON line. Prompts cross as space-separated ids through a pass-through
    tokenizer so that both sides see the very same token ids.

Records go to `results/sampling_tunix.jsonl` with `peer` = `tunix-<version>`; the
generic table in the README renders them. Tunix decodes every row for the full N steps
(no stop token can match: its end-of-sequence id is set to -1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TUNIX_PYTHON = os.path.join(os.path.dirname(HERE), ".venv-tunix", "bin", "python")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small-100m")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--prompt_len", type=int, nargs="+", default=[128, 512])
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="batch 1 and 8, prompt 128, 16 new tokens, one repeat")
    p.add_argument("--python", default=TUNIX_PYTHON, help="the Tunix venv's interpreter")
    p.add_argument("--results_dir", default=None)
    p.add_argument("--no_save", action="store_true")
    # Worker mode (inside the Tunix venv).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hf_dir", help=argparse.SUPPRESS)
    p.add_argument("--prompts_file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.prompt_len, args.new_tokens, args.repeats = [1, 8], [128], 16, 1
    return args


# ------------------------------------------------------------------------- worker side
class _IdTokenizer:
    """Tunix's sampler takes strings: this one maps "5 17 9" <-> [5, 17, 9] unchanged."""

    def encode(self, text: str, **_) -> list[int]:
        return [int(x) for x in text.split()]

    def decode(self, ids, **_) -> str:
        return " ".join(str(int(i)) for i in ids)

    def bos_id(self):
        return None  # Tunix prepends a BOS only when this is truthy

    def eos_id(self) -> int:
        return -1

    def pad_id(self) -> int:
        return 0


def worker(args: argparse.Namespace) -> None:
    """Times Tunix's greedy sampler on every prompt set in --prompts_file; prints JSON."""
    import statistics
    import time
    from importlib import metadata

    import jax
    from tunix.generate import sampler as tunix_sampler
    from tunix.models.qwen2 import model as qwen2_model
    from tunix.models.qwen2 import params as qwen2_params

    with open(os.path.join(args.hf_dir, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    rope = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    config = qwen2_model.ModelConfig(
        num_layers=hf["num_hidden_layers"], vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"], head_dim=head_dim,
        num_kv_heads=hf["num_key_value_heads"], rope_theta=int(rope),
        norm_eps=hf["rms_norm_eps"], use_tied_embedding=bool(hf.get("tie_word_embeddings")))
    model = qwen2_params.create_model_from_safe_tensors(args.hf_dir, config)
    with open(args.prompts_file, encoding="utf-8") as f:
        jobs = json.load(f)
    results = []
    for job in jobs:
        prompts, n = job["prompts"], job["new_tokens"]
        width = 1 << (max(map(len, prompts)) - 1).bit_length()
        sampler = tunix_sampler.Sampler(
            model, _IdTokenizer(),
            tunix_sampler.CacheConfig(cache_size=width + n, num_layers=config.num_layers,
                                      num_kv_heads=config.num_kv_heads,
                                      head_dim=config.head_dim))
        texts = [" ".join(map(str, p)) for p in prompts]

        def generate():
            out = sampler(texts, max_generation_steps=n, max_prompt_length=width,
                          echo=False, temperature=0.0, eos_tokens=[-1])
            jax.block_until_ready(out.tokens)
            return out

        t0 = time.perf_counter()
        out = generate()
        first = time.perf_counter() - t0
        times = []
        for _ in range(job["repeats"]):
            t0 = time.perf_counter()
            out = generate()
            times.append(time.perf_counter() - t0)
        results.append({"generate_s": statistics.median(times), "first_s": first,
                        "tokens": [list(map(int, t))[:n] for t in out.tokens]})
    print("RESULT " + json.dumps({"version": metadata.version("google-tunix"),
                                  "jax": jax.__version__, "results": results}))


# ------------------------------------------------------------------------- driver side
def run(args: argparse.Namespace) -> list[dict]:
    """Ours vs Tunix on every (batch, prompt length); returns (and appends) records."""
    from benchmarks import common, sampling
    from rlver_jax.sampling import Sampler

    if not os.path.exists(args.python):
        raise FileNotFoundError(f"{args.python}: no Tunix venv (run `make bench-peers`)")
    machine = common.machine_info()
    config, model, twin = common.build_twin_models(args.preset)
    sampler = Sampler(model)
    jobs, ours = [], []
    n = args.new_tokens
    for prompt_len in args.prompt_len:
        for batch in args.batch:
            prompts = common.random_prompts(batch, prompt_len, config.vocab_size,
                                            seed=batch * 7919 + prompt_len)
            first, total, _ = sampling._time_ours(sampler, model, prompts, n, args.repeats)
            greedy = sampler.generate(model, prompts, n).tokens
            jobs.append({"prompts": prompts, "new_tokens": n, "repeats": args.repeats})
            ours.append((batch, prompt_len, first, total, greedy))
    with tempfile.TemporaryDirectory() as tmp:
        twin.save_pretrained(tmp)
        prompts_file = os.path.join(tmp, "prompts.json")
        with open(prompts_file, "w", encoding="utf-8") as f:
            json.dump(jobs, f)
        proc = subprocess.run(
            [args.python, os.path.abspath(__file__), "--worker", "--hf_dir", tmp,
             "--prompts_file", prompts_file], capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"Tunix worker failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    peer_out = json.loads(lines[-1][len("RESULT "):])
    records = []
    for (batch, prompt_len, first, total, greedy), peer in zip(ours, peer_out["results"]):
        # Greedy tokens should agree until float round-off flips an argmax.
        agree = sum(a == b for g, p in zip(greedy, peer["tokens"]) for a, b in zip(g, p))
        record = common.base_record(
            "sampling_tunix", {"preset": args.preset, "batch": batch, "prompt_len": prompt_len,
                               "new_tokens": n, "dtype": "float32", "greedy": True}, machine)
        record.update(
            tokens_per_s=batch * n / total, generate_s=total, compile_s=max(first - total, 0),
            peer=f"tunix-{peer_out['version']}/jax-{peer_out['jax']}",
            peer_tokens_per_s=batch * n / peer["generate_s"],
            peer_generate_s=peer["generate_s"],
            peer_compile_s=max(peer["first_s"] - peer["generate_s"], 0.0),
            ratio=peer["generate_s"] / total, greedy_token_agreement=agree / (batch * n))
        print(f"sampling vs tunix {args.preset} B={batch} P={prompt_len} N={n}: ours "
              f"{record['tokens_per_s']:.1f} tok/s, tunix {record['peer_tokens_per_s']:.1f} "
              f"tok/s, ratio {record['ratio']:.2f}, greedy agreement "
              f"{record['greedy_token_agreement']:.0%}", flush=True)
        records.append(record)
    if not args.no_save:
        common.append_results("sampling_tunix", records, args.results_dir)
    return records


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
    else:
        run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
