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
    `tunix.models.qwen2.params.create_model_from_safe_tensors`, warms up
    `tunix.generate.sampler.Sampler(...)(prompts, max_generation_steps=N)` in greedy mode for
    every job (one JSON line: compile times and tokens), then serves `run I` requests (one
    timed call each, `serve`), so the driver interleaves ours and Tunix's calls: ours,
    Tunix, ours, ... for `--repeats` rounds. Prompts cross as space-separated ids through a pass-through
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
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (>= 3)")
    p.add_argument("--quick", action="store_true",
                   help="batch 1 and 8, prompt 128, 16 new tokens, 3 rounds")
    p.add_argument("--python", default=TUNIX_PYTHON, help="the Tunix venv's interpreter")
    p.add_argument("--results_dir", default=None)
    p.add_argument("--no_save", action="store_true")
    # Worker mode (inside the Tunix venv).
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--hf_dir", help=argparse.SUPPRESS)
    p.add_argument("--prompts_file", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.prompt_len, args.new_tokens, args.repeats = [1, 8], [128], 16, 3
    if args.repeats < 3:
        p.error(f"--repeats {args.repeats}: at least 3 interleaved rounds are needed")
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
    """Warms up Tunix's greedy sampler on every prompt set in --prompts_file (one JSON line:
    compile times, tokens), then serves timed calls (`serve`)."""
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

    def make_generate(prompts, n):
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
        return generate

    generates, results = [], []
    for job in jobs:  # warm-up (compiles) of every job before any timing
        generate = make_generate(job["prompts"], job["new_tokens"])
        t0 = time.perf_counter()
        out = generate()
        results.append({"first_s": time.perf_counter() - t0,
                        "tokens": [list(map(int, t))[:job["new_tokens"]] for t in out.tokens]})
        generates.append(generate)
    print("RESULT " + json.dumps({"version": metadata.version("google-tunix"),
                                  "jax": jax.__version__, "results": results}), flush=True)
    serve(generates, sys.stdin, sys.stdout)


def serve(generates, stdin, stdout) -> None:
    """The worker's line protocol, so that the driver can interleave ours and Tunix's calls:
    `run I` times job I once and answers `TIME <seconds>`; `quit` (or end of input) ends."""
    import time

    print("READY", file=stdout, flush=True)
    for line in stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "quit":
            break
        if cmd[0] == "run" and len(cmd) == 2 and cmd[1].isdigit() \
                and int(cmd[1]) < len(generates):
            t0 = time.perf_counter()
            generates[int(cmd[1])]()
            print(f"TIME {time.perf_counter() - t0!r}", file=stdout, flush=True)
        else:
            print(f"ERROR unknown command {line.strip()!r}", file=stdout, flush=True)


class PeerWorker:
    """The driver's end of `serve`: a worker process started with `argv`, its first
    `RESULT` line (warm-up results) in `header`, and `run(i)` -> the worker's own seconds."""

    def __init__(self, argv: list[str], log_path: str):
        self._log = open(log_path, "w+", encoding="utf-8")  # stderr: never a full pipe
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1)
        self.header = json.loads(self._expect("RESULT "))
        self._expect("READY")

    def _expect(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith("ERROR "):
                raise RuntimeError(f"peer worker: {line[6:].strip()}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        self.proc.wait()
        self._log.seek(0)
        raise RuntimeError(f"peer worker exited ({self.proc.returncode}) before "
                           f"{prefix.strip()!r}:\n{self._log.read()[-4000:]}")

    def run(self, job: int) -> float:
        self.proc.stdin.write(f"run {job}\n")
        self.proc.stdin.flush()
        return float(self._expect("TIME "))

    def close(self) -> int:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        code = self.proc.wait()
        self._log.close()
        return code


# ------------------------------------------------------------------------- driver side
def _record(args, machine, batch, prompt_len, first, times, greedy, peer, peer_out) -> dict:
    import statistics

    from benchmarks import common

    n = args.new_tokens
    total, peer_total = statistics.median(times["ours"]), statistics.median(times["peer"])
    # Greedy tokens should agree until float round-off flips an argmax.
    agree = sum(a == b for g, p in zip(greedy, peer["tokens"]) for a, b in zip(g, p))
    record = common.base_record(
        "sampling_tunix", {"preset": args.preset, "batch": batch, "prompt_len": prompt_len,
                           "new_tokens": n, "dtype": "float32", "greedy": True}, machine)
    record.update(
        tokens_per_s=batch * n / total, generate_s=total, compile_s=max(first - total, 0),
        peer=f"tunix-{peer_out['version']}/jax-{peer_out['jax']}",
        peer_tokens_per_s=batch * n / peer_total, peer_generate_s=peer_total,
        peer_compile_s=max(peer["first_s"] - peer_total, 0.0),
        greedy_token_agreement=agree / (batch * n))
    record.update(common.timing_fields(times))
    print(f"sampling vs tunix {args.preset} B={batch} P={prompt_len} N={n}: ours "
          f"{record['tokens_per_s']:.1f} tok/s, tunix {record['peer_tokens_per_s']:.1f} "
          f"tok/s, ratio {record['ratio']:.2f} [{record['ratio_min']:.2f}, "
          f"{record['ratio_max']:.2f}], greedy agreement "
          f"{record['greedy_token_agreement']:.0%}", flush=True)
    return record


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
            first, generate, _ = sampling._ours_calls(sampler, model, prompts, n)
            greedy = sampler.generate(model, prompts, n).tokens
            jobs.append({"prompts": prompts, "new_tokens": n})
            ours.append((batch, prompt_len, first, generate, greedy))
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        twin.save_pretrained(tmp)
        prompts_file = os.path.join(tmp, "prompts.json")
        with open(prompts_file, "w", encoding="utf-8") as f:
            json.dump(jobs, f)
        # One worker for the whole run: it loads and compiles once, then times one call per
        # request, so the two samplers alternate (ours, Tunix, ours, ...) like the others.
        worker_proc = PeerWorker([args.python, os.path.abspath(__file__), "--worker",
                                  "--hf_dir", tmp, "--prompts_file", prompts_file],
                                 os.path.join(tmp, "worker.log"))
        try:
            peer_out = worker_proc.header
            for job, ((batch, prompt_len, first, generate, greedy), peer) in enumerate(
                    zip(ours, peer_out["results"])):
                peer_s: list[float] = []
                wall = common.time_interleaved(
                    {"ours": generate,
                     "peer": lambda job=job: peer_s.append(worker_proc.run(job))},
                    args.repeats)
                # The worker's own clock: no pipe round trip in the peer's time.
                times = {"ours": wall["ours"], "peer": peer_s}
                records.append(_record(args, machine, batch, prompt_len, first, times, greedy,
                                       peer, peer_out))
        finally:
            worker_proc.close()
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
