"""Tokenised-corpus reader: memory-mapped token files -> packed fixed-length batches.

A token file is a flat array of token ids, documents separated by an end-of-document token
(`eos_id`, the last token of each document). Its element type comes from its name:
  * `.npy`: a 1-D integer array (the type is in the header);
  * `.u32`: raw little-endian uint32 (what `dsv3 tokenize` writes; holds any vocabulary);
  * `.u16` and `.bin` (the historical name): raw uint16, only for vocabularies of at most 65,536
    ids (`check_token_files` refuses them for a larger vocab_size: DeepSeek-V3 has 129,280).
Any other name is refused (a text or JSON file is never read as token ids: `dsv3 tokenize` turns
text into a token file), as is a raw file that looks like text. Files are memory-mapped, never
read whole. `check_token_files` checks every file (exists, not empty, ids < vocab_size) before a
run creates anything.

Packing ("concatenate and chunk"): each file is cut into consecutive windows of `seq_len` tokens;
a row of a batch is one window, which may hold several documents (segment ids 1, 2, ... in the
row, a new segment starting after each eos) and cut documents at its edges. Each epoch visits the
windows of all files in a fresh permutation drawn from (seed, epoch); the tail that does not fill
a whole batch is skipped for that epoch. The position in the stream is `DataState(epoch, step)`,
two integers, so a run resumes mid-epoch exactly where it stopped.

Multi-host: with `num_shards` > 1 each process reads only its `batch_size / num_shards` rows of
the global batch (shard `shard_index`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from dsv3_jax.errors import UserError

__all__ = ["Batch", "DataState", "TokenDataset", "write_tokens", "segments_and_positions",
           "ByteTokenizer", "DataError", "token_dtype", "check_token_files", "TOKEN_SUFFIXES"]

# suffix -> element type of a raw token file (.npy carries its own)
RAW_DTYPES = {".u32": np.dtype("<u4"), ".u16": np.dtype("<u2"), ".bin": np.dtype("<u2")}
TOKEN_SUFFIXES = (".npy", *RAW_DTYPES)


class DataError(ValueError, UserError):
  """A token file that cannot be trained on (missing, empty, wrong type, ids beyond the
  vocabulary); the message names the file."""


def token_dtype(path: str | os.PathLike) -> np.dtype | None:
  """The element type of a raw token file by its suffix (None for .npy: its header says);
  DataError for any other suffix."""
  path = os.fspath(path)
  if path.endswith(".npy"):
    return None
  for suffix, dt in RAW_DTYPES.items():
    if path.endswith(suffix):
      return dt
  raise DataError(f"{path}: not a token file (expected {', '.join(TOKEN_SUFFIXES)}); turn text "
                  f"into tokens with `dsv3 tokenize`")


@dataclasses.dataclass(frozen=True)
class Batch:
  """tokens / segment_ids / positions: int32 [B, T]. Positions restart at 0 in each segment."""

  tokens: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray


@dataclasses.dataclass(frozen=True)
class DataState:
  """Where the reader is: batch `step` of epoch `epoch`."""

  epoch: int = 0
  step: int = 0

  def to_dict(self) -> dict:
    return {"epoch": int(self.epoch), "step": int(self.step)}

  @classmethod
  def from_dict(cls, d: dict) -> "DataState":
    return cls(epoch=int(d["epoch"]), step=int(d["step"]))


def write_tokens(path: str | os.PathLike, tokens, dtype=None) -> None:
  """Writes a flat token array (atomically: temp file, then rename) in the type its suffix names
  (`token_dtype`; `.npy` is written as uint32). `dtype` overrides the type of a raw file."""
  arr = np.asarray(tokens)
  path = os.fspath(path)
  npy = path.endswith(".npy")
  dtype = np.dtype(dtype or (np.uint32 if npy else token_dtype(path)))
  info = np.iinfo(dtype)
  if arr.size and (arr.min() < 0 or arr.max() > info.max):
    raise DataError(f"{path}: token ids span [{arr.min()}, {arr.max()}], outside {dtype.name}")
  tmp = f"{path}.tmp{os.getpid()}"  # several processes of one run may write the same file
  with open(tmp, "wb") as f:
    if npy:
      np.save(f, arr.astype(dtype))
    else:
      arr.astype(dtype).tofile(f)
  os.replace(tmp, path)


def _looks_like_text(path: str) -> bool:
  """A raw file whose first 4 KiB are NUL-free, valid UTF-8 and printable is text, not tokens
  (small token ids in uint16/uint32 always have zero bytes)."""
  with open(path, "rb") as f:
    head = f.read(4096)
  if not head or b"\0" in head:
    return False
  try:
    text = head.decode("utf-8")
  except UnicodeDecodeError as e:
    if e.start < len(head) - 4:  # not just a character cut at the 4 KiB boundary
      return False
    text = head[:e.start].decode("utf-8")
  printable = sum(c.isprintable() or c.isspace() for c in text)
  return printable >= 0.95 * max(len(text), 1)


def _open(path: str, dtype) -> np.ndarray:
  if not os.path.exists(path):
    raise DataError(f"token file {path} does not exist")
  if os.path.isdir(path):
    raise DataError(f"token file {path} is a directory")
  if os.path.getsize(path) == 0:
    raise DataError(f"token file {path} is empty")
  if path.endswith(".npy"):
    try:
      arr = np.load(path, mmap_mode="r")
    except ValueError as e:
      raise DataError(f"{path}: not a valid .npy file ({e})") from None
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
      raise DataError(f"{path}: expected a 1-D integer token array, got {arr.dtype} {arr.shape}")
    if arr.size == 0:
      raise DataError(f"token file {path} is empty (0 tokens)")
    return arr
  dtype = np.dtype(dtype) if dtype is not None else token_dtype(path)
  if _looks_like_text(path):
    raise DataError(f"{path}: looks like text, not {dtype.name} token ids; turn text into tokens "
                    f"with `dsv3 tokenize`")
  size = os.path.getsize(path)
  if size % dtype.itemsize:
    raise DataError(f"{path}: {size} bytes is not a whole number of {dtype.name} tokens")
  return np.memmap(path, dtype=dtype, mode="r")


def check_token_files(paths: Sequence[str | os.PathLike], vocab_size: int,
                      chunk: int = 1 << 26) -> list[int]:
  """Checks each token file before a run starts: it exists, is a token file (`token_dtype`), is
  not empty, its type can hold the vocabulary (uint16 only when vocab_size <= 65,536) and all its
  ids are in [0, vocab_size) (one pass over the file, `chunk` tokens at a time). Returns the
  token count of each file; raises DataError naming the file."""
  counts = []
  for p in paths:
    p = os.fspath(p)
    arr = _open(p, None)
    if np.iinfo(arr.dtype).max < vocab_size - 1 and not p.endswith(".npy"):
      raise DataError(f"{p}: {arr.dtype.name} tokens cannot hold the ids of vocab_size "
                      f"{vocab_size}; write uint32 tokens (.u32 or .npy, as `dsv3 tokenize` does)")
    for i in range(0, len(arr), chunk):
      part = np.asarray(arr[i:i + chunk])
      lo, hi = int(part.min()), int(part.max())
      if lo < 0 or hi >= vocab_size:
        bad = int(np.flatnonzero((part < 0) | (part >= vocab_size))[0]) + i
        raise DataError(f"{p}: token id {int(arr[bad])} at position {bad} is outside the "
                        f"vocabulary [0, {vocab_size})")
    counts.append(len(arr))
  return counts


def segments_and_positions(tokens: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Segment ids (1-based, a new one after each eos) and in-segment positions for [B, T] rows."""
  is_eos = tokens == eos_id
  seg = 1 + np.cumsum(is_eos, axis=1) - is_eos  # the eos belongs to the document it ends
  T = tokens.shape[1]
  idx = np.broadcast_to(np.arange(T), tokens.shape)
  start = np.where(np.concatenate([np.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], 1), idx, 0)
  start = np.maximum.accumulate(start, axis=1)
  return seg.astype(np.int32), (idx - start).astype(np.int32)


class TokenDataset:
  """Deterministic, resumable packed batches from memory-mapped token files (see module doc).

  paths: token files; seq_len: T; batch_size: global rows per batch; eos_id: end-of-document id;
  seed: shuffling seed; dtype: element type of raw files (None: by suffix, see `token_dtype`);
  vocab_size: if given, every batch is checked to hold ids < vocab_size.
  """

  def __init__(self, paths: Sequence[str | os.PathLike] | str, *, seq_len: int, batch_size: int,
               eos_id: int, seed: int = 0, dtype=None, vocab_size: int | None = None,
               shard_index: int = 0, num_shards: int = 1, state: DataState | None = None):
    if isinstance(paths, (str, os.PathLike)):
      paths = [paths]
    if seq_len < 2 or batch_size < 1:
      raise DataError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    if num_shards < 1 or batch_size % num_shards or not 0 <= shard_index < num_shards:
      raise ValueError(f"batch_size {batch_size} must split evenly over {num_shards} shards "
                       f"(shard_index {shard_index})")
    self.paths = [os.fspath(p) for p in paths]
    self.files = [_open(p, dtype) for p in self.paths]
    self.seq_len, self.batch_size, self.eos_id, self.seed = seq_len, batch_size, eos_id, seed
    self.vocab_size, self.shard_index, self.num_shards = vocab_size, shard_index, num_shards
    counts = [len(f) // seq_len for f in self.files]
    # Window w of the virtual concatenation -> (file, first token).
    self._file_of = np.repeat(np.arange(len(counts)), counts)
    self._offset = np.concatenate([np.arange(c) * seq_len for c in counts]) if counts else np.zeros(0)
    self.num_windows = int(sum(counts))
    if self.num_windows < batch_size:
      raise DataError(f"{', '.join(self.paths)}: {sum(len(f) for f in self.files)} tokens give "
                      f"{self.num_windows} windows of {seq_len}, fewer than one batch of {batch_size}")
    self.steps_per_epoch = self.num_windows // batch_size
    self.state = state or DataState()
    self._perm_epoch, self._perm = None, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm_epoch != epoch:
      self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
      self._perm_epoch = epoch
    return self._perm

  def batch_at(self, state: DataState) -> Batch:
    """The batch at `state` (pure: does not move the reader)."""
    B, T = self.batch_size, self.seq_len
    perm = self._permutation(state.epoch)
    rows = perm[state.step * B:(state.step + 1) * B]
    per = B // self.num_shards
    rows = rows[self.shard_index * per:(self.shard_index + 1) * per]
    tokens = np.stack([np.asarray(self.files[self._file_of[w]][self._offset[w]:self._offset[w] + T])
                       for w in rows]).astype(np.int32)
    if self.vocab_size is not None and tokens.max() >= self.vocab_size:
      raise DataError(f"{', '.join(self.paths)}: token id {tokens.max()} >= vocab_size "
                      f"{self.vocab_size}")
    seg, pos = segments_and_positions(tokens, self.eos_id)
    return Batch(tokens, seg, pos)

  def next_batch(self) -> Batch:
    """The batch at the current state; advances the state (rolling over to the next epoch)."""
    batch = self.batch_at(self.state)
    step = self.state.step + 1
    self.state = (DataState(self.state.epoch + 1, 0) if step >= self.steps_per_epoch
                  else DataState(self.state.epoch, step))
    return batch

  def __iter__(self):
    while True:
      yield self.next_batch()


class ByteTokenizer:
  """UTF-8 bytes as token ids 0..255; id 0 (NUL, absent from text) ends a document."""

  vocab_size = 256
  eos_id = 0

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")
