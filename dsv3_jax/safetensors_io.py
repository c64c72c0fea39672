"""Lazy safetensors reading and atomic writing with numpy + ml_dtypes (bf16, fp8), no torch.

Format: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw little-endian data.
Tensors are returned as read-only memory-mapped views, so reading a 5 GB shard costs no RAM
until a tensor is used.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from dsv3_jax.errors import UserError

__all__ = ["SafetensorsFile", "SafetensorsError", "save_file", "DTYPES"]

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    # Power-of-two block scales (ue8m0) stored as their exponent byte: 2 ** (byte - 127).
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError, UserError):
  """A safetensors file is missing, truncated or malformed (the message names the file)."""


class SafetensorsFile:
  """Read-only view of one .safetensors file. `f[name]` -> np.ndarray (memory-mapped)."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise SafetensorsError(f"{self.path}: file not found")
    size = os.path.getsize(self.path)
    with open(self.path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise SafetensorsError(f"{self.path}: truncated (only {size} bytes, no header)")
      (n,) = struct.unpack("<Q", head)
      if n > min(_MAX_HEADER, size - 8):
        raise SafetensorsError(f"{self.path}: corrupt or truncated header (declares {n} bytes, "
                               f"file has {size})")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{self.path}: corrupt header ({e})") from None
    self.metadata = header.pop("__metadata__", None) or {}
    self._data_start = 8 + n
    data_len = size - self._data_start
    self._entries = {}
    for name, e in header.items():
      try:
        dtype = DTYPES[e["dtype"]]
        shape = tuple(int(d) for d in e["shape"])
        begin, end = (int(x) for x in e["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise SafetensorsError(f"{self.path}: tensor {name!r}: malformed header entry {e}") from None
      expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      if end - begin != expected:
        raise SafetensorsError(f"{self.path}: tensor {name!r}: {end - begin} bytes for shape "
                               f"{shape} {e['dtype']} (expected {expected})")
      if end > data_len:
        raise SafetensorsError(f"{self.path}: truncated: tensor {name!r} ends at byte "
                               f"{self._data_start + end} but the file has {size} bytes")
      self._entries[name] = (dtype, shape, begin)
    self._mmap = None

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entries[name][1]

  def dtype(self, name: str) -> np.dtype:
    return self._entries[name][0]

  def nbytes(self, name: str) -> int:
    dtype, shape, _ = self._entries[name]
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._entries:
      raise KeyError(f"{self.path}: no tensor {name!r}")
    dtype, shape, begin = self._entries[name]
    if self._mmap is None:
      self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = self._mmap[self._data_start + begin:self._data_start + begin + n]
    return raw.view(dtype).reshape(shape)

  def close(self):
    self._mmap = None


def save_file(tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], path: str,
              metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors to `path` atomically (a temporary file renamed into place when complete)."""
  items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
  header, offset = {}, 0
  for name, arr in items:
    arr = np.asarray(arr)
    if arr.dtype not in _NAMES:
      raise SafetensorsError(f"{path}: tensor {name!r}: dtype {arr.dtype} cannot be stored")
    header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  if metadata:
    header["__metadata__"] = dict(metadata)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for _, arr in items:
        f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
