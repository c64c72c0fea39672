"""Tokenised-corpus reader: memory-mapped token files -> packed fixed-length batches.

A token file is a flat array of token ids, documents separated by an end-of-document token
(`eos_id`, the last token of each document): a raw `.bin` file of `dtype` (uint16 by default, as
written by `write_tokens`) or a `.npy` array. Files are memory-mapped, never read whole.

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

__all__ = ["Batch", "DataState", "TokenDataset", "write_tokens", "segments_and_positions",
           "ByteTokenizer"]


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


def write_tokens(path: str | os.PathLike, tokens, dtype=np.uint16) -> None:
  """Writes a flat token array as a raw `.bin` file (atomically: temp file, then rename)."""
  arr = np.asarray(tokens)
  info = np.iinfo(dtype)
  if arr.size and (arr.min() < 0 or arr.max() > info.max):
    raise ValueError(f"{path}: token ids span [{arr.min()}, {arr.max()}], outside {np.dtype(dtype).name}")
  path = os.fspath(path)
  tmp = f"{path}.tmp{os.getpid()}"  # several processes of one run may write the same file
  arr.astype(dtype).tofile(tmp)
  os.replace(tmp, path)


def _open(path: str, dtype) -> np.ndarray:
  if not os.path.exists(path):
    raise FileNotFoundError(f"token file {path} does not exist")
  if path.endswith(".npy"):
    arr = np.load(path, mmap_mode="r")
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"{path}: expected a 1-D integer token array, got {arr.dtype} {arr.shape}")
    return arr
  size = os.path.getsize(path)
  item = np.dtype(dtype).itemsize
  if size % item:
    raise ValueError(f"{path}: {size} bytes is not a whole number of {np.dtype(dtype).name} tokens")
  return np.memmap(path, dtype=dtype, mode="r")


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
  seed: shuffling seed; dtype: element type of `.bin` files; vocab_size: if given, every batch is
  checked to hold ids < vocab_size.
  """

  def __init__(self, paths: Sequence[str | os.PathLike] | str, *, seq_len: int, batch_size: int,
               eos_id: int, seed: int = 0, dtype=np.uint16, vocab_size: int | None = None,
               shard_index: int = 0, num_shards: int = 1, state: DataState | None = None):
    if isinstance(paths, (str, os.PathLike)):
      paths = [paths]
    if seq_len < 2 or batch_size < 1:
      raise ValueError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
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
      raise ValueError(f"{self.paths}: {sum(len(f) for f in self.files)} tokens give "
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
      raise ValueError(f"{self.paths}: token id {tokens.max()} >= vocab_size {self.vocab_size}")
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
