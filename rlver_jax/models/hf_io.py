"""Hugging Face Qwen2 directories in and out: `load_hf`, `save_hf`, critic loading.

Loading maps every safetensors file into memory and builds each (sharded) device array
with `jax.make_array_from_callback`, so each device reads only its own slice and the host
never holds two copies of the model. Only safetensors are read (never pickles).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from huggingface_hub import split_state_dict_into_shards_factory

from rlver_jax.models.config import Qwen2Config
from rlver_jax.models.qwen2 import DecoderStack, Qwen2, Qwen2Critic
from rlver_jax.models.safetensors_io import SafetensorsFile, tensor_nbytes, write_safetensors
from rlver_jax.sharding import param_shardings

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_FILE_PATTERN = "model{suffix}.safetensors"   # suffix: "" or "-00001-of-00003"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "tokenizer.model")


class CheckpointFormatError(ValueError):
    """An HF directory is missing a file or tensor, or a tensor has the wrong shape."""


# ------------------------------------------------------------------ name and layout maps
def _layer_map(c: Qwen2Config) -> dict[str, tuple[str, Callable, Callable]]:
    """Stacked param -> (HF name template, HF->ours per layer, ours->HF per layer)."""
    D, N, K, H = c.hidden_size, c.num_heads, c.num_kv_heads, c.resolved_head_dim
    p = "model.layers.{i}."
    same = (lambda w: w, lambda w: w)
    return {
        "input_norm": (p + "input_layernorm.weight", *same),
        "post_norm": (p + "post_attention_layernorm.weight", *same),
        "q_kernel": (p + "self_attn.q_proj.weight",
                     lambda w: w.T.reshape(D, N, H), lambda w: w.reshape(D, N * H).T),
        "q_bias": (p + "self_attn.q_proj.bias",
                   lambda w: w.reshape(N, H), lambda w: w.reshape(N * H)),
        "k_kernel": (p + "self_attn.k_proj.weight",
                     lambda w: w.T.reshape(D, K, H), lambda w: w.reshape(D, K * H).T),
        "k_bias": (p + "self_attn.k_proj.bias",
                   lambda w: w.reshape(K, H), lambda w: w.reshape(K * H)),
        "v_kernel": (p + "self_attn.v_proj.weight",
                     lambda w: w.T.reshape(D, K, H), lambda w: w.reshape(D, K * H).T),
        "v_bias": (p + "self_attn.v_proj.bias",
                   lambda w: w.reshape(K, H), lambda w: w.reshape(K * H)),
        "o_kernel": (p + "self_attn.o_proj.weight",
                     lambda w: w.T.reshape(N, H, D), lambda w: w.reshape(N * H, D).T),
        "gate_kernel": (p + "mlp.gate_proj.weight", lambda w: w.T, lambda w: w.T),
        "up_kernel": (p + "mlp.up_proj.weight", lambda w: w.T, lambda w: w.T),
        "down_kernel": (p + "mlp.down_proj.weight", lambda w: w.T, lambda w: w.T),
    }


def _hf_shape(c: Qwen2Config, name: str) -> tuple[int, ...]:
    D, N, K, H, F = (c.hidden_size, c.num_heads, c.num_kv_heads, c.resolved_head_dim,
                     c.intermediate_size)
    return {
        "input_norm": (D,), "post_norm": (D,), "q_kernel": (N * H, D), "q_bias": (N * H,),
        "k_kernel": (K * H, D), "k_bias": (K * H,), "v_kernel": (K * H, D),
        "v_bias": (K * H,), "o_kernel": (D, N * H), "gate_kernel": (F, D),
        "up_kernel": (F, D), "down_kernel": (D, F),
    }[name]


# ----------------------------------------------------------------------------- reading
class _TensorIndex:
    """Finds HF tensors across one file or a sharded index."""

    def __init__(self, path: str):
        self.path = path
        index_path = os.path.join(path, INDEX_FILE)
        single_path = os.path.join(path, SINGLE_FILE)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointFormatError(f"{index_path}: no 'weight_map' object")
            self.files = {}
            self.location = {}
            for name, filename in weight_map.items():
                if filename not in self.files:
                    file_path = os.path.join(path, filename)
                    if not os.path.isfile(file_path):
                        raise CheckpointFormatError(
                            f"{index_path}: tensor {name!r} is in {filename}, which is missing")
                    self.files[filename] = SafetensorsFile(file_path)
                self.location[name] = self.files[filename]
        elif os.path.isfile(single_path):
            f = SafetensorsFile(single_path)
            self.files = {SINGLE_FILE: f}
            self.location = {name: f for name in f.keys()}
        else:
            found = sorted(os.listdir(path))
            hint = (" (only PyTorch .bin weights found: convert them to safetensors; pickles "
                    "are never loaded)" if any(n.endswith(".bin") for n in found) else "")
            raise CheckpointFormatError(
                f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found{hint}; files: {found}")

    def __contains__(self, name):
        return name in self.location

    def get(self, name: str, expected_shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.location:
            raise CheckpointFormatError(f"{self.path}: missing tensor {name!r}")
        array = self.location[name][name]
        if tuple(array.shape) != tuple(expected_shape):
            raise CheckpointFormatError(
                f"{self.path}: tensor {name!r} has shape {tuple(array.shape)}, "
                f"expected {tuple(expected_shape)}")
        return array


def _read_config(path: str, dtype: str, param_dtype: str | None = None,
                 **overrides) -> Qwen2Config:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"HF model directory not found: {path}")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointFormatError(f"{path}: no config.json (not an HF model directory)")
    try:
        return Qwen2Config.from_json_file(config_path,
                                          **{"param_dtype": param_dtype or dtype, "dtype": dtype,
                                             **overrides})
    except KeyError as e:  # a missing key; its message already names the file
        raise CheckpointFormatError(str(e.args[0]) if e.args else str(e)) from e
    except (ValueError, TypeError, NotImplementedError, UnicodeDecodeError) as e:
        text = str(e)
        raise CheckpointFormatError(text if config_path in text else f"{config_path}: {text}"
                                    ) from e


def stored_dtype(path: str | os.PathLike) -> str:
    """The dtype an HF directory's weights are stored in (its config.json's `dtype` /
    `torch_dtype`; float32 when it names none): what an export defaults to."""
    _read_config(path, "float32")  # the clear errors of a malformed directory
    return Qwen2Config.from_json_file(os.path.join(os.fspath(path), "config.json")).param_dtype


def _fill(model: nnx.Module, source: Callable[[tuple, tuple[int, ...]], Callable],
          mesh, rules) -> None:
    """Replaces every Param of an abstract `model` by a device array built slice by slice.

    `source(path, shape)` returns a function from an index (tuple of slices) to numpy.
    """
    state = nnx.state(model)
    shardings = None
    if mesh is not None:
        shardings = dict(nnx.to_flat_state(param_shardings(state, mesh, rules)))
    for path, var in nnx.to_flat_state(state):
        shape, dtype = tuple(var.shape), var.dtype
        read = source(path, shape)
        if shardings is not None:
            sharding = shardings[path]
        else:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        array = jax.make_array_from_callback(
            shape, sharding, lambda index, read=read, dtype=dtype: np.asarray(read(index),
                                                                                dtype=dtype))
        var.set_value(array)
    nnx.update(model, state)


def _backbone_source(config: Qwen2Config, tensors: _TensorIndex, prefix: tuple = ()):
    layer_map = _layer_map(config)

    def source(path, shape):
        path = tuple(str(p) for p in path[len(prefix):])
        if path == ("embed",):
            w = tensors.get("model.embed_tokens.weight", shape)
            return lambda index: w[index]
        if path == ("final_norm",):
            w = tensors.get("model.norm.weight", shape)
            return lambda index: w[index]
        if path == ("lm_head",):
            w = tensors.get("lm_head.weight", shape[::-1])
            return lambda index: w.T[index]
        if path[0] == "layers" and path[1] in layer_map:
            name, to_ours, _ = layer_map[path[1]]
            hf_shape = _hf_shape(config, path[1])
            per_layer = [tensors.get(name.format(i=i), hf_shape)
                         for i in range(config.num_layers)]

            def read(index):
                layers = range(config.num_layers)[index[0]]
                return np.stack([to_ours(per_layer[i])[index[1:]] for i in layers])
            return read
        raise KeyError(f"no HF tensor for parameter {'/'.join(path)}")

    return source


def load_hf(path: str | os.PathLike, dtype: str = "float32", mesh=None, rules=None,
            param_dtype: str | None = None, **config_overrides) -> tuple[Qwen2Config, Qwen2]:
    """Reads an HF Qwen2 directory into a (sharded) `Qwen2` computing in `dtype`, with its
    weights stored in `param_dtype` (default `dtype`: a model that is never trained).

    `config_overrides` set non-architectural config fields (e.g. remat="full").
    """
    path = os.fspath(path)
    config = _read_config(path, dtype, param_dtype, **config_overrides)
    tensors = _TensorIndex(path)
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        # Some exporters write the tied head anyway; it is ignored by design.
        pass
    model = nnx.eval_shape(lambda: Qwen2(config, rngs=nnx.Rngs(0)))
    _fill(model, _backbone_source(config, tensors), mesh, rules)
    return config, model


def load_hf_critic(path: str | os.PathLike, dtype: str = "float32", mesh=None, rules=None,
                   param_dtype: str | None = None, **config_overrides
                   ) -> tuple[Qwen2Config, Qwen2Critic]:
    """A critic from an HF directory: backbone from the LM; the value head from a
    `score.weight` [1, D] (Qwen2ForTokenClassification layout) when present, else zeros.
    Weights stored in `param_dtype` (default `dtype`), computed in `dtype`."""
    path = os.fspath(path)
    config = _read_config(path, dtype, param_dtype, **config_overrides)
    tensors = _TensorIndex(path)
    critic = nnx.eval_shape(lambda: Qwen2Critic(config, rngs=nnx.Rngs(0)))
    backbone = _backbone_source(config, tensors, prefix=("backbone",))

    def source(path_, shape):
        if path_[0] == "backbone":
            return backbone(path_, shape)
        if path_ == ("value_kernel",) and "score.weight" in tensors:
            w = tensors.get("score.weight", (1, config.hidden_size))
            return lambda index: w[0][index]
        if path_ == ("value_bias",) and "score.bias" in tensors:
            w = tensors.get("score.bias", (1,))
            return lambda index: w.reshape(())[index]
        return lambda index: np.zeros(shape, np.float32)[index]

    _fill(critic, source, mesh, rules)
    return config, critic


# ----------------------------------------------------------------------------- writing
def _to_host(array: jax.Array) -> np.ndarray:
    """Host copy of a (possibly sharded, possibly multi-host) array."""
    if not array.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))


def _export_plan(model: Qwen2, config: Qwen2Config, np_dtype
                 ) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    """HF name -> (shape, producer of the numpy tensor), in HF's usual order."""
    plan: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]] = {}
    plan["model.embed_tokens.weight"] = (
        (config.vocab_size, config.hidden_size), lambda: _to_host(model.embed[...]))
    stack: DecoderStack = model.layers
    layer_map = _layer_map(config)
    for i in range(config.num_layers):
        for ours, (name, _, to_hf) in layer_map.items():
            def produce(ours=ours, i=i, to_hf=to_hf):
                return to_hf(_to_host(getattr(stack, ours)[...][i]))
            plan[name.format(i=i)] = (_hf_shape(config, ours), produce)
    plan["model.norm.weight"] = ((config.hidden_size,), lambda: _to_host(model.final_norm[...]))
    if not config.tie_word_embeddings:
        plan["lm_head.weight"] = ((config.vocab_size, config.hidden_size),
                                  lambda: _to_host(model.lm_head[...]).T)
    return plan


def save_hf(model: Qwen2 | Qwen2Critic, config: Qwen2Config, out_dir: str | os.PathLike,
            dtype: str | None = None, tokenizer_dir: str | os.PathLike | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
            generation_config: dict | None = None) -> list[str]:
    """Writes an HF directory that `AutoModelForCausalLM.from_pretrained` loads.

    A critic is written as its backbone plus `score.weight` / `score.bias` (the
    token-classification head layout). Returns the written file names.
    Only process 0 writes in a multi-process run; all processes must call it.
    """
    out_dir = os.fspath(out_dir)
    dtype = dtype or config.param_dtype
    np_dtype = np.dtype(jnp.dtype(dtype))
    is_critic = isinstance(model, Qwen2Critic)
    lm = model.backbone if is_critic else model
    plan = _export_plan(lm, config, np_dtype)
    if is_critic:
        plan.pop("lm_head.weight", None)
        plan["score.weight"] = ((1, config.hidden_size),
                                lambda: _to_host(model.value_kernel[...])[None])
        plan["score.bias"] = ((1,), lambda: _to_host(model.value_bias[...]).reshape(1))

    # huggingface_hub's packing (what transformers' save_pretrained uses), on the known
    # sizes: the tensors themselves are produced one at a time while writing.
    split = split_state_dict_into_shards_factory(
        {name: shape for name, (shape, _) in plan.items()},
        get_storage_size=lambda shape: tensor_nbytes(shape, np_dtype),
        filename_pattern=SHARD_FILE_PATTERN, max_shard_size=max_shard_bytes)

    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    written = []
    for filename, names in split.filename_to_tensors.items():
        layout = {name: (plan[name][0], np_dtype) for name in names}
        if writer:
            write_safetensors(os.path.join(out_dir, filename), layout,
                              lambda name: plan[name][1](), metadata={"format": "pt"})
        else:  # other processes still take part in the all-gathers
            for name in names:
                plan[name][1]()
        written.append(filename)
    if not writer:
        return written

    if split.is_sharded:
        with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename},
                      f, indent=2, sort_keys=True)
        written.append(INDEX_FILE)
    hf_config = config.to_hf_dict(dtype)
    if is_critic:
        hf_config.update(architectures=["Qwen2ForTokenClassification"], num_labels=1)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
    written.append("config.json")
    gen = {"bos_token_id": config.bos_token_id,
           "eos_token_id": (list(config.eos_token_id) if isinstance(config.eos_token_id, tuple)
                            else config.eos_token_id)}
    gen.update(generation_config or {})
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2, sort_keys=True)
    written.append("generation_config.json")
    if tokenizer_dir is not None:
        tokenizer_dir = os.fspath(tokenizer_dir)
        if not os.path.isdir(tokenizer_dir):
            raise FileNotFoundError(f"tokenizer directory not found: {tokenizer_dir}")
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
                written.append(name)
    return written
