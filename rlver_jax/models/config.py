"""Qwen2 / Qwen2.5 model configuration, HF `config.json` in and out, and presets.

The presets carry the exact hyper-parameters of the published Qwen2.5 *-Instruct*
`config.json` files (the paper trains Qwen2.5-7B-Instruct); `tiny` and `tiny-sim` are
random-weight CPU presets for tests and the embedded default run.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax.numpy as jnp

# Attention logits of masked slots. Finite (not -inf) so that a fully masked query row (a
# left-padding position) yields a harmless uniform average instead of NaN.
MASK_VALUE = -1e30

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# models/attention.py IMPLEMENTATIONS (repeated here: config.py imports no model code).
ATTENTION_IMPLEMENTATIONS = ("auto", "reference", "blockwise", "xla", "cudnn", "splash")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Architecture and numerics of one Qwen2-family decoder.

    Hashable (frozen) so that it can be a static argument of jitted functions.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None: hidden_size // num_heads (Qwen2 convention)
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    # Numerics: weights are stored in `param_dtype`, matmuls run in `dtype`; norms, softmax,
    # rotary angles and logits are always float32.
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "none"
    initializer_range: float = 0.02
    # Attention implementation (models/attention.py IMPLEMENTATIONS); "auto" picks per backend.
    attention: str = "auto"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                    f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                    f"({self.num_kv_heads})")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}: expected one of "
                             f"{ATTENTION_IMPLEMENTATIONS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: expected one of {REMAT_POLICIES}")
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field}={getattr(self, field)!r}: expected one of {DTYPES}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def replace(self, **changes) -> "Qwen2Config":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------- HF config.json
    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], **overrides) -> "Qwen2Config":
        """Builds a config from an HF `config.json` dict (transformers 4.x or 5.x layout)."""
        source = hf.get("_source", "config.json")
        def need(key):
            if key not in hf:
                raise KeyError(f"{source}: missing required key {key!r}")
            return positive_int(key, hf[key])

        def positive_int(key, value):
            # json gives bools for true/false, which int checks would let through.
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{source}: key {key!r} must be a positive integer, "
                                 f"got {value!r}")
            return value

        def number(key, default):
            value = hf.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{source}: key {key!r} must be a number, got {value!r}")
            return float(value)

        model_type = hf.get("model_type", "qwen2")
        if model_type not in ("qwen2",):
            raise ValueError(f"{source}: model_type={model_type!r}, expected 'qwen2'")
        # transformers 5.x moved rope_theta into rope_parameters.
        rope_theta = hf.get("rope_theta")
        rope_params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if not isinstance(rope_params, Mapping):
            raise ValueError(f"{source}: key 'rope_parameters' must be an object, "
                             f"got {rope_params!r}")
        if rope_theta is None:
            rope_theta = rope_params.get("rope_theta", 10_000.0)
        if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)):
            raise ValueError(f"{source}: key 'rope_theta' must be a number, got {rope_theta!r}")
        rope_type = rope_params.get("rope_type", rope_params.get("type", "default"))
        if rope_type not in ("default", None):
            raise NotImplementedError(f"{source}: rope_type={rope_type!r} is not supported")
        if hf.get("use_sliding_window", False):
            raise NotImplementedError(f"{source}: use_sliding_window=true is not supported")
        stored_dtype = hf.get("dtype", hf.get("torch_dtype")) or "float32"
        eos = hf.get("eos_token_id", None)
        kwargs = dict(
                vocab_size=need("vocab_size"),
                hidden_size=need("hidden_size"),
                intermediate_size=need("intermediate_size"),
                num_layers=need("num_hidden_layers"),
                num_heads=need("num_attention_heads"),
                num_kv_heads=(positive_int("num_key_value_heads", hf["num_key_value_heads"])
                              if hf.get("num_key_value_heads") is not None
                              else need("num_attention_heads")),
                head_dim=(positive_int("head_dim", hf["head_dim"])
                          if hf.get("head_dim") is not None else None),
                rope_theta=float(rope_theta),
                rms_norm_eps=number("rms_norm_eps", 1e-6),
                max_position_embeddings=positive_int(
                    "max_position_embeddings", hf.get("max_position_embeddings", 32768)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                param_dtype=stored_dtype if stored_dtype in DTYPES else "float32",
                dtype=stored_dtype if stored_dtype in DTYPES else "float32",
                initializer_range=number("initializer_range", 0.02),
        )
        if kwargs["head_dim"] == kwargs["hidden_size"] // kwargs["num_heads"]:
            kwargs["head_dim"] = None
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """An HF `config.json` dict that transformers 4.x and 5.x both read.

        Both rope layouts are written: 4.x reads `rope_theta`, 5.x `rope_parameters`.
        """
        dtype = dtype or self.param_dtype
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out = {
                "architectures": ["Qwen2ForCausalLM"],
                "model_type": "qwen2",
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads,
                "num_key_value_heads": self.num_kv_heads,
                "hidden_act": "silu",
                "max_position_embeddings": self.max_position_embeddings,
                "rms_norm_eps": self.rms_norm_eps,
                "rope_theta": self.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
                "tie_word_embeddings": self.tie_word_embeddings,
                "use_sliding_window": False,
                "sliding_window": None,
                "max_window_layers": self.num_layers,
                "attention_dropout": 0.0,
                "initializer_range": self.initializer_range,
                "use_cache": True,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": eos,
                "torch_dtype": dtype,
                "dtype": dtype,
        }
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        return out

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides) -> "Qwen2Config":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from e
        hf["_source"] = path
        return cls.from_hf_dict(hf, **overrides)

    def to_json_file(self, path: str | os.PathLike, dtype: str | None = None) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_hf_dict(dtype), f, indent=2, sort_keys=True)
            f.write("\n")


def _qwen25(hidden, inter, layers, heads, kv_heads, tied, vocab):
    return Qwen2Config(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
            num_heads=heads, num_kv_heads=kv_heads, tie_word_embeddings=tied,
            rope_theta=1_000_000.0, rms_norm_eps=1e-6, max_position_embeddings=32768,
            bos_token_id=151643, eos_token_id=151645, param_dtype="bfloat16", dtype="bfloat16")


PRESETS: dict[str, Qwen2Config] = {
        "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, True, 151936),
        "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, True, 151936),
        "qwen2.5-3b": _qwen25(2048, 11008, 36, 16, 2, True, 151936),
        "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, False, 152064),
        "qwen2.5-14b": _qwen25(5120, 13824, 48, 40, 8, False, 152064),
        "qwen2.5-32b": _qwen25(5120, 27648, 64, 40, 8, False, 152064),
        "qwen2.5-72b": _qwen25(8192, 29568, 80, 64, 8, False, 152064),
        # CPU presets. The vocabulary matches the bundled tiny sentencepiece tokenizer; the
        # tokenizer's special ids are filled in by the caller (see tokenizer.py).
        "tiny": Qwen2Config(
                vocab_size=2048, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
                num_kv_heads=2, rope_theta=10_000.0, max_position_embeddings=4096,
                tie_word_embeddings=True, bos_token_id=None, eos_token_id=None),
        # ~100M parameters: the CPU benchmark size.
        "small-100m": Qwen2Config(
                vocab_size=32768, hidden_size=768, intermediate_size=2048, num_layers=12,
                num_heads=12, num_kv_heads=4, rope_theta=10_000.0, max_position_embeddings=8192,
                tie_word_embeddings=True, bos_token_id=None, eos_token_id=None),
}


def get_preset(name: str, **overrides) -> Qwen2Config:
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
