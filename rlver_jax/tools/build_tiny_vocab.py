"""Rebuilds `rlver_jax/assets/tiny_spm.model`, the tiny sentencepiece vocab for CPU presets.

    python -m rlver_jax.tools.build_tiny_vocab [--out FILE] [--check]

Trains a 2,048-piece BPE model with byte fallback on the text the package ships (profiles
`env/data/*.jsonl` and prompt templates `env/prompts/*.txt`, plus a small built-in corpus),
single-threaded, so the same text always gives the same bytes. Retraining changes token ids:
checkpoints of tiny models trained with the old vocab no longer decode correctly.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

from rlver_jax import tokenizer as tok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(tok.__file__).parent / "assets" / tok.TINY_ASSET)
    parser.add_argument("--vocab_size", type=int, default=tok.TINY_VOCAB_SIZE)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from a fresh build")
    args = parser.parse_args(argv)

    files = tok.tiny_corpus_files()
    t0 = time.perf_counter()
    model = tok.build_tiny_spm_model(files, vocab_size=args.vocab_size)
    took = time.perf_counter() - t0
    digest = hashlib.sha256(model).hexdigest()[:16]
    print(f"trained on {len(files)} files in {took:.2f} s: {len(model)} bytes, sha256 {digest}")
    for f in files:
        print(f"  {f.relative_to(Path(tok.__file__).parent)}")
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == model
        print("up to date" if same else f"{args.out.name} differs from a fresh build")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(model)
    print(f"wrote {args.out.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
