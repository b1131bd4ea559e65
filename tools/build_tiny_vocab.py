"""Rebuilds `rlver_jax/assets/tiny_spm.model`, the tiny sentencepiece vocab for CPU presets.

    python -m tools.build_tiny_vocab [--out FILE] [--check]

Trains a 2,048-piece BPE model with byte fallback on the text the package ships (profiles
`env/data/*.jsonl` and prompt templates `env/prompts/*.txt`, plus a small built-in corpus),
single-threaded, so the same text always gives the same bytes. Retraining changes token ids:
checkpoints of tiny models trained with the old vocab no longer decode correctly.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rlver_jax import tokenizer_assets as tok

PACKAGE_DIR = Path(tok.__file__).parent

# Used when the package ships no text to train on (it normally ships profiles and prompts).
_BUILTIN_CORPUS = """\
I have been feeling really low lately and I don't know who to talk to.
That sounds exhausting. It makes sense that you feel this way after such a long week.
My manager criticized my work in front of everyone, and I felt humiliated.
Would you like to tell me more about what happened?
I'm glad you reached out. You don't have to go through this alone.
我最近压力很大，工作和家里的事情都让我喘不过气来。
听起来你真的很累，愿意多说一点吗？
<think>The user feels unheard; acknowledge first, then ask an open question.</think>
Emotion: 45. The reply felt caring but a bit generic.
"""


#: Profiles the tiny vocab trains on. English only: with 2,048 pieces, the ~1,000 distinct Chinese
#: characters of the zh profiles would crowd out English merges (byte fallback still covers them).
TINY_PROFILE_FILES = ("en_train.jsonl", "en_eval.jsonl")


def tiny_corpus_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Returns the shipped text the tiny vocab is trained on, in a fixed order.

    The English profiles (`env/data/en_{train,eval}.jsonl`) and the prompt templates
    (`env/prompts/*.txt` but the knob tables) under `root` (default: this package's source directory).
    """
    base = Path(root) if root is not None else PACKAGE_DIR
    files = [base / "env" / "data" / name for name in TINY_PROFILE_FILES]
    # The knob tables (knobs_*.txt) came after the vocab was trained: training on them would
    # change every tiny token id.
    files += sorted(f for f in (base / "env" / "prompts").glob("*.txt") if not f.name.startswith("knobs_"))
    return [f for f in files if f.is_file()]


def _corpus_lines(files: Sequence[Path]) -> list[str]:
    lines: list[str] = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        if f.suffix == ".jsonl":
            # Train on the values people will actually type, not on JSON syntax and escapes.
            for raw in text.splitlines():
                if raw.strip():
                    lines.extend(_json_strings(json.loads(raw)))
        else:
            lines.extend(text.splitlines())
    lines = [ln for ln in (s.strip("\n") for s in lines) if ln.strip()]
    return lines + _BUILTIN_CORPUS.splitlines()


def _json_strings(obj: Any) -> Iterable[str]:
    if isinstance(obj, str):
        yield from obj.splitlines()
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _json_strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _json_strings(v)


def build_tiny_spm_model(
    files: Sequence[str | os.PathLike[str]] | None = None, vocab_size: int = tok.TINY_VOCAB_SIZE
) -> bytes:
    """Trains the tiny sentencepiece BPE model in memory and returns its serialized bytes.

    Deterministic for fixed input (one thread, no sampling or shuffling of sentences). Settings
    are chosen so that `decode(encode(x)) == x` for any text: identity normalization, no dummy
    prefix, whitespace kept, byte fallback for unseen characters.
    """
    import sentencepiece as spm

    paths = [Path(f) for f in files] if files is not None else tiny_corpus_files()
    lines = _corpus_lines(paths)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        control_symbols=list(tok.TINY_CONTROL_SYMBOLS),
        user_defined_symbols=list(tok.TINY_USER_SYMBOLS),
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    return buf.getvalue()




def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=PACKAGE_DIR / "assets" / tok.TINY_ASSET)
    parser.add_argument("--vocab_size", type=int, default=tok.TINY_VOCAB_SIZE)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out differs from a fresh build")
    args = parser.parse_args(argv)

    files = tiny_corpus_files()
    t0 = time.perf_counter()
    model = build_tiny_spm_model(files, vocab_size=args.vocab_size)
    took = time.perf_counter() - t0
    digest = hashlib.sha256(model).hexdigest()[:16]
    print(f"trained on {len(files)} files in {took:.2f} s: {len(model)} bytes, sha256 {digest}")
    for f in files:
        print(f"  {f.relative_to(PACKAGE_DIR)}")
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
