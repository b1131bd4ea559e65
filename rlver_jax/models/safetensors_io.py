"""Minimal safetensors reader/writer over memory maps.

The `safetensors` package's numpy backend cannot hold bfloat16, and its flax backend puts
every tensor whole on the default device. Reading the (simple, documented) format directly
gives zero-copy numpy views in any dtype, so each device shard can be cut from the mapped
file without a second host copy of the checkpoint.
Format: 8-byte little-endian header size, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Lazily mapped tensors of one .safetensors file: `f[name]` is a read-only view."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (truncated header)")
            (header_size,) = struct.unpack("<Q", raw)
            try:
                header = json.loads(f.read(header_size))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: corrupt safetensors header: {e}") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self._data_start = 8 + header_size
        self._map = None

    def keys(self) -> list[str]:
        return list(self.header)

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def __getitem__(self, name: str) -> np.ndarray:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        info = self.header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        raw = self._map[self._data_start + start:self._data_start + end]
        return raw.view(dtype).reshape(info["shape"])


def tensor_nbytes(shape: Iterable[int], dtype) -> int:
    return int(np.prod(tuple(shape), dtype=np.int64)) * np.dtype(dtype).itemsize


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, tuple[tuple[int, ...], object]],
                      produce, metadata: Mapping[str, str] | None = None) -> None:
    """Writes a file whose layout is known before the data.

    tensors: name -> (shape, numpy dtype), in file order. `produce(name)` returns that
    tensor as a numpy array when its turn comes, so only one tensor is in host memory.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, (shape, dtype) in tensors.items():
        n = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (shape, dtype) in tensors.items():
            array = np.ascontiguousarray(produce(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {name!r}: produced shape {array.shape}, "
                                 f"declared {tuple(shape)}")
            f.write(array.tobytes())
    os.replace(tmp, path)
