"""Converted Orbax directory -> HF safetensors in the official names (sharded, with an index).

The same name table as the converter, inverted (`checkpoint.to_hf`). One parameter is restored
at a time and its tensors streamed into pre-planned shards (the shard layout follows from the
manifest alone), so memory stays bounded by the largest parameter.

dtype:
  "bfloat16"  every tensor bf16 except the router bias (float32, as in the official files);
  "float32"   every tensor float32;
  "float8"    the official FP8 format: linear and expert weights float8_e4m3fn with a float32
              `weight_scale_inv` per block (stored FP8 weights are written bit-exactly; bf16/fp32
              weights are quantised per block: scale = amax/448, or its power of two above for
              scale_fmt ue8m0); mlp.gate, lm_head, embeddings and norms bf16, the bias float32.
The MTP layers' stored copies of embed_tokens and lm_head are written back.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from dsv3_jax.checkpoint import SCALE_SUFFIX, CheckpointError, Entry, hf_shape, name_table, to_hf
from dsv3_jax.config import ModelConfig, RuntimeConfig
from dsv3_jax.errors import UserError
from dsv3_jax.convert.convert import TOKENIZER_FILES
from dsv3_jax.convert.orbax_io import staging_dir
from dsv3_jax.param_tree import (CheckpointNotFound, locate, mtp_depth_stored, restore_numpy,
                                 stored_params)
from dsv3_jax.pretrained import abstract_model, param_shapes
from dsv3_jax.safetensors_io import DTYPES as ST_DTYPES

__all__ = ["export", "quantize_blocks", "EXPORT_DTYPES"]

EXPORT_DTYPES = ("bfloat16", "float32", "float8")
_NAMES = {v: k for k, v in ST_DTYPES.items()}
_BF16, _F32, _E4M3 = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32),
                      np.dtype(ml_dtypes.float8_e4m3fn))
E4M3_MAX = 448.0


def quantize_blocks(w: np.ndarray, block: tuple[int, int] = (128, 128), pow2: bool = False,
                    ) -> tuple[np.ndarray, np.ndarray]:
  """w [out, in] -> (float8_e4m3fn [out, in], float32 scale_inv [ceil(out/bm), ceil(in/bn)]).

  Per block: scale = max(amax, 1e-10) / 448 (rounded up to a power of two when `pow2`, the
  ue8m0 format); value = clip(w / scale, -448, 448) rounded to nearest e4m3.
  """
  bm, bn = block
  m, n = w.shape
  sm, sn = -(-m // bm), -(-n // bn)
  w32 = np.zeros((sm * bm, sn * bn), np.float32)
  w32[:m, :n] = w
  tiles = w32.reshape(sm, bm, sn, bn)
  amax = np.abs(tiles).max(axis=(1, 3))
  scale = (np.maximum(amax, 1e-10) * np.float32(1.0 / E4M3_MAX)).astype(np.float32)
  if pow2:
    scale = np.exp2(np.ceil(np.log2(scale))).astype(np.float32)
  q = np.clip(tiles / scale[:, None, :, None], -E4M3_MAX, E4M3_MAX).astype(_E4M3)
  return q.reshape(sm * bm, sn * bn)[:m, :n], scale


def _quantizable(e: Entry) -> bool:
  """Weights the official FP8 checkpoints quantise (linear layers except router and head)."""
  return e.kind in ("linear", "expert") and not e.target.endswith(("mlp.gate.kernel", "lm_head.kernel"))


class _Target:
  """What one parameter becomes: [(hf name, dtype, shape)] and, given its value, the tensors."""

  def __init__(self, target, entries, entry, shape, dtype, block, pow2):
    self.target, self.entries, self.entry = target, entries, entry
    self.shape, self.dtype, self.block, self.pow2 = tuple(shape), dtype, block, pow2
    self.bias = target.endswith("e_score_correction_bias")
    e0 = entries[0][1]
    self.fp8 = dtype == "float8" and _quantizable(e0)

  def specs(self) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    out = []
    for name, e in self.entries:
      shp = hf_shape(e, self.shape)
      if self.fp8:
        sshape = (-(-shp[0] // self.block[0]), -(-shp[1] // self.block[1]))
        out += [(name, _E4M3, shp), (name + SCALE_SUFFIX, _F32, sshape)]
      else:
        out.append((name, _F32 if self.dtype == "float32" or self.bias else _BF16, shp))
    return out

  def tensors(self, value: np.ndarray, scale: np.ndarray | None) -> Iterator[tuple[str, np.ndarray]]:
    if scale is not None and not self.fp8:  # stored FP8 -> dequantise to our layout
      bm, bn = self.entry["block"]
      m, n = value.shape[-2:]
      s = np.repeat(np.repeat(scale, bm, -2), bn, -1)[..., :m, :n]
      value, scale = np.swapaxes(value.astype(np.float32) * s, -1, -2), None
    for (name, e), spec in zip(self.entries, self.specs()[:: 2 if self.fp8 else 1]):
      if self.fp8 and scale is not None:  # stored FP8, written bit-exactly
        idx = (e.expert,) if e.kind == "expert" else ()
        yield name, value[idx]
        yield name + SCALE_SUFFIX, scale[idx]
      elif self.fp8:
        q, s = quantize_blocks(to_hf(e, value).astype(np.float32), self.block, self.pow2)
        yield name, q
        yield name + SCALE_SUFFIX, s
      else:
        yield name, np.ascontiguousarray(to_hf(e, value)).astype(spec[1], copy=False)


class _ShardWriter:
  """Writes planned safetensors shards, tensors arriving in plan order."""

  def __init__(self, directory: str, specs: list[tuple[str, np.dtype, tuple]], max_bytes: int):
    self.dir = directory
    shards, cur, size = [], [], 0
    for spec in specs:
      nb = int(np.prod(spec[2], dtype=np.int64)) * spec[1].itemsize
      if cur and size + nb > max_bytes:
        shards.append(cur)
        cur, size = [], 0
      cur.append(spec)
      size += nb
    if cur:
      shards.append(cur)
    n = len(shards)
    self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    self.plan = [(f, spec) for f, shard in zip(self.files, shards) for spec in shard]
    self.shards = dict(zip(self.files, shards))
    self.total = sum(int(np.prod(s[2], dtype=np.int64)) * s[1].itemsize for s in specs)
    self._i, self._fh, self._file = 0, None, None

  def _open(self, file: str):
    if self._fh is not None:
      self._fh.close()
    header, offset = {}, 0
    for name, dtype, shape in self.shards[file]:
      nb = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
      header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nb]}
      offset += nb
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    self._fh = open(os.path.join(self.dir, file), "wb")
    self._fh.write(struct.pack("<Q", len(blob)) + blob)
    self._file = file

  def add(self, name: str, arr: np.ndarray) -> None:
    file, (want, dtype, shape) = self.plan[self._i]
    if (name, arr.dtype, tuple(arr.shape)) != (want, dtype, tuple(shape)):
      raise AssertionError(f"export plan mismatch: got {name} {arr.dtype} {arr.shape}, planned "
                           f"{want} {dtype} {shape}")
    if file != self._file:
      self._open(file)
    self._fh.write(np.ascontiguousarray(arr).tobytes())
    self._i += 1

  def close(self) -> dict:
    if self._fh is not None:
      self._fh.close()
    assert self._i == len(self.plan), "export wrote fewer tensors than planned"
    return {"metadata": {"total_size": self.total},
            "weight_map": {spec[0]: f for f, spec in self.plan}}


def export(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16",
           max_shard_bytes: int = 5 << 30, overwrite: bool = False, progress: bool = True) -> str:
  """Writes checkpoint `src` to `out` as HF safetensors shards + index + config.json.

  src: a converted directory (`dsv3 convert`), a training run's directory (its latest step) or
    one of its step directories (`dsv3 train --out`: run/checkpoints/<step>).
  dtype: "bfloat16" | "float32" | "float8" (see the module docstring). Returns `out`, which
  appears only when complete (written in a temporary sibling, then renamed). The same source
  always gives the same bytes.
  """
  if dtype not in EXPORT_DTYPES:
    raise UserError(f"--dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
  src, out = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(out))
  if os.path.lexists(out) and not overwrite:
    raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
  located = locate(src)
  if located is None:
    raise CheckpointNotFound(f"{src}: not a converted dsv3 checkpoint or a training run / step "
                             f"directory (no dsv3_checkpoint.json, checkpoints/ or params/)")
  manifest = located.manifest or {}
  stored = stored_params(located.params_dir)
  with open(os.path.join(located.config_dir, "config.json")) as f:
    raw_cfg = json.load(f)
  cfg = ModelConfig.from_hf_config(raw_cfg).replace(num_nextn_predict_layers=mtp_depth_stored(stored))
  shapes = param_shapes(abstract_model(cfg, RuntimeConfig()))
  table = name_table(cfg, shapes)
  fp8_info = manifest.get("fp8") or {}
  q = cfg.quantization_config
  block = tuple(fp8_info.get("weight_block_size") or (q.weight_block_size if q else (128, 128)))
  scale_fmt = fp8_info.get("scale_fmt") or (q.scale_fmt if q else None)
  by_target: dict[str, list[tuple[str, Entry]]] = {}
  for n, e in table.items():
    by_target.setdefault(e.target, []).append((n, e))
  missing = [t for t in by_target if t not in stored]
  if missing:
    raise CheckpointError(f"{located.params_dir}: parameters missing from the checkpoint, e.g. "
                          f"{missing[:5]}")
  targets = []
  for t in by_target:  # write order: the name table's
    entry = dict(stored[t], block=tuple(fp8_info.get("weight_block_size", (128, 128))))
    targets.append(_Target(t, by_target[t], entry, shapes[t], dtype, block, scale_fmt == "ue8m0"))
  parent, name = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  tmp = staging_dir(out)
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    writer = _ShardWriter(tmp, [s for t in targets for s in t.specs()], max_shard_bytes)
    bar = None
    if progress:
      from tqdm import tqdm
      bar = tqdm(total=writer.total, unit="B", unit_scale=True, unit_divisor=1024, desc="export")
    for t in targets:
      value, scale = restore_numpy(located.params_dir, [t.target], stored)[t.target]
      for n, arr in t.tensors(value, scale):
        writer.add(n, arr)
        if bar is not None:
          bar.update(arr.nbytes)
      del value, scale
    index = writer.close()
    if bar is not None:
      bar.close()
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
    raw_cfg.pop("quantization_config", None)
    if dtype == "float8":
      raw_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                        "activation_scheme": "dynamic",
                                        "weight_block_size": list(block)}
      if scale_fmt:
        raw_cfg["quantization_config"]["scale_fmt"] = scale_fmt
    raw_cfg["torch_dtype"] = "float32" if dtype == "float32" else "bfloat16"
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(raw_cfg, f, indent=2)
    for fname in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(located.config_dir, fname)):
        shutil.copyfile(os.path.join(located.config_dir, fname), os.path.join(tmp, fname))
    if os.path.lexists(out):
      old = os.path.join(parent, f".{name}.old-{os.getpid()}")
      os.rename(out, old)
      os.rename(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
