"""HF safetensors directory -> converted Orbax directory, streaming one parameter at a time.

The parameter list comes from the abstract model (`name_table(cfg, param_shapes(abstract))`), so
the converter, the loader and the exporter share one table. Memory: each target (one parameter,
routed experts stacked into [E, ...]) is read, written and dropped before the next; the source
shards are memory-mapped and unmapped after every target, so peak RSS is a small multiple of the
largest parameter, not the model size.

dtype "bfloat16" / "float32": FP8 blocks are dequantised (weight * scale_inv per block, partial
edge blocks, float32 or power-of-two ue8m0 scales alike) and cast. dtype "float8": e4m3 weights
are kept bit-exactly with their float32 block scales in the checkpoint's [out, in] layout
(see `orbax_io`); tensors that are not FP8 in the source (norms, embeddings, lm_head, mlp.gate,
the router bias) are stored as in the bf16 model.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Iterator, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from dsv3_jax.checkpoint import (SCALE_SUFFIX, CheckpointError, Entry, HFCheckpoint, hf_shape,
                                 name_table, read_targets)
from dsv3_jax.config import ModelConfig, RuntimeConfig
from dsv3_jax.convert.orbax_io import OrbaxWriter
from dsv3_jax.pretrained import abstract_model, param_dtypes, param_shapes
from dsv3_jax.errors import UserError
from dsv3_jax.safetensors_io import SafetensorsError

__all__ = ["DTYPES", "convert", "read_targets_fp8", "check_checkpoint", "TOKENIZER_FILES",
           "mtp_depth_present"]

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float8": jnp.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json", "generation_config.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "added_tokens.json")
_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
_FP8 = (_E4M3, np.dtype(ml_dtypes.float8_e5m2))


def mtp_depth_present(ckpt: HFCheckpoint, cfg: ModelConfig) -> int:
  """How many of the config's MTP layers (checkpoint index num_hidden_layers + k) are stored."""
  prefixes = [f"model.layers.{cfg.num_hidden_layers + k}." for k in range(cfg.num_nextn_predict_layers)]
  names = ckpt.names()
  depth = 0
  while depth < len(prefixes) and any(n.startswith(prefixes[depth]) for n in names):
    depth += 1
  return depth


def check_checkpoint(ckpt: HFCheckpoint, table: Mapping[str, Entry],
                     shapes: Mapping[str, tuple[int, ...]], *, ignore_unexpected: bool = False,
                     ) -> int:
  """Checks names, shapes and FP8 scales from the shard headers alone (no tensor data read).

  Opens every shard (a missing, truncated or corrupt file fails here), and raises
  CheckpointError naming the tensor and file for: an unexpected name (unless
  `ignore_unexpected`), a tensor missing from the index or from its shard, a shape that
  contradicts config.json, an FP8 weight without `_scale_inv`. Returns the bytes to be read.
  """
  names = set(ckpt.names())
  scales = {n for n in names if n.endswith(SCALE_SUFFIX)}
  unexpected = sorted(names - scales - set(table))
  if unexpected and not ignore_unexpected:
    raise CheckpointError(f"{len(unexpected)} unexpected tensor(s) in {ckpt.path}, e.g. "
                          + ", ".join(f"{n!r} ({ckpt.file_of(n)})" for n in unexpected[:5])
                          + " (pass --ignore-unexpected to skip them)")
  missing = sorted(n for n in table if n not in names)
  if missing:
    raise CheckpointError(f"{len(missing)} tensor(s) the model needs are missing from "
                          f"{ckpt.path} (not in the index), e.g. "
                          + ", ".join(repr(n) for n in missing[:5]))
  total = 0
  for name, e in table.items():
    try:
      f = ckpt.shard(name)
    except SafetensorsError as err:
      raise CheckpointError(f"{err} (while reading {name!r})") from None
    got, want = tuple(f.shape(name)), hf_shape(e, tuple(shapes[e.target]))
    if got != want:
      raise CheckpointError(f"{f.path}: tensor {name!r} has shape {got}, config.json implies {want}")
    total += f.nbytes(name)
    scale = name + SCALE_SUFFIX
    if f.dtype(name) in _FP8:
      if scale not in names:
        raise CheckpointError(f"{f.path}: FP8 tensor {name!r} has no {scale!r}")
    if scale in names:
      total += ckpt.shard(scale).nbytes(scale)
  ckpt.close()
  return total


def read_targets_fp8(ckpt: HFCheckpoint, table: Mapping[str, Entry],
                     shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, np.dtype], *,
                     block: tuple[int, int] = (128, 128),
                     ) -> Iterator[tuple[str, np.ndarray, np.ndarray | None, list[str]]]:
  """Like `read_targets`, but keeps FP8 e4m3 weights quantised.

  Yields (parameter path, value, scale_inv, source names), one target at a time:
    - a target whose source tensors are float8_e4m3fn with scales (linear and routed-expert
      weights): value [..., out, in] e4m3 (the checkpoint layout, experts stacked),
      scale_inv [..., ceil(out/bm), ceil(in/bn)] float32;
    - any other target: value in our layout and abstract dtype (`dtypes`), scale_inv None.
  Names are assumed checked (`check_checkpoint`); stored MTP copies ("tied") are compared with
  the main tensors at the end.
  """
  by_target: dict[str, list[tuple[str, Entry]]] = {}
  copies = [(n, e) for n, e in table.items() if e.kind.startswith("tied")]
  for name, e in table.items():
    if not e.kind.startswith("tied"):
      by_target.setdefault(e.target, []).append((name, e))
  keep = {e.target: None for _, e in copies}
  for target, sources in by_target.items():
    shape, dtype = tuple(shapes[target]), np.dtype(dtypes[target])
    quantized = [ckpt.raw(n).dtype == _E4M3 and sources[0][1].kind in ("linear", "expert")
                 for n, _ in sources]
    if all(quantized):
      value, scale = _read_quantized(ckpt, sources, shape, block)
      if target in keep:
        keep[target] = _dequant_ours(value, scale, block).astype(dtype)
      yield target, value, scale, [n for n, _ in sources]
      continue
    if any(quantized):
      raise CheckpointError(f"{target}: some of its source tensors are FP8 and some are not "
                            f"(e.g. {sources[quantized.index(False)][0]!r} is not)")
    out = _read_plain(ckpt, sources, shape, dtype, block)
    if target in keep:
      keep[target] = out
    yield target, out, None, [n for n, _ in sources]
  for name, e in copies:
    x = ckpt.read(name, block)
    x = (x.T if e.kind == "tied_linear" else x).astype(dtypes[e.target])
    if not np.array_equal(x, keep[e.target]):
      raise CheckpointError(f"{ckpt.file_of(name)}: {name!r} should be a copy of the main model's "
                            f"{e.target!r} (shared in this implementation) but differs")


def _read_plain(ckpt, sources, shape, dtype, block):
  """One target in our layout and `dtype` (FP8 sources other than e4m3 weights dequantised)."""
  def ours(name, e):
    x = ckpt.read(name, block)
    return x.T if e.kind in ("linear", "tied_linear", "expert") else x
  if sources[0][1].kind == "expert":
    out = np.empty(shape, dtype)
    for name, e in sources:
      out[e.expert] = ours(name, e)
    return out
  (name, e), = sources
  x = np.asarray(ours(name, e))
  return x if x.dtype == dtype else x.astype(dtype)


def _read_quantized(ckpt, sources, shape, block):
  """Stacks the e4m3 values and scales of one target in the checkpoint layout."""
  bm, bn = block
  e0 = sources[0][1]
  hf = hf_shape(e0, shape)
  sshape = (-(-hf[0] // bm), -(-hf[1] // bn))
  lead = (shape[0],) if e0.kind == "expert" else ()
  value = np.empty(lead + hf, _E4M3)
  scale = np.empty(lead + sshape, np.float32)
  for name, e in sources:
    w, s = ckpt.raw(name), ckpt.raw(name + SCALE_SUFFIX)
    if tuple(s.shape) != sshape:
      raise CheckpointError(f"{ckpt.file_of(name + SCALE_SUFFIX)}: {name + SCALE_SUFFIX!r} has "
                            f"shape {tuple(s.shape)}, weight {hf} with {bm}x{bn} blocks needs {sshape}")
    idx = (e.expert,) if e.kind == "expert" else ()
    value[idx] = w
    scale[idx] = s.astype(np.float32)
  if e0.kind == "expert" and len(sources) != shape[0]:
    raise CheckpointError(f"{e0.target}: {len(sources)} expert tensors for {shape[0]} experts")
  return value, scale


def _dequant_ours(value, scale, block):
  bm, bn = block
  m, n = value.shape[-2:]
  s = np.repeat(np.repeat(scale, bm, -2), bn, -1)[..., :m, :n]
  return np.swapaxes(value.astype(np.float32) * s, -1, -2)


def _config_json(src: str, dtype: str) -> str:
  with open(os.path.join(src, "config.json")) as f:
    raw = json.load(f)
  if dtype != "float8":
    raw.pop("quantization_config", None)  # the stored weights are no longer quantised
  return json.dumps(raw, indent=2)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "bfloat16",
            overwrite: bool = False, ignore_unexpected: bool = False, workers: int = 1,
            progress: bool = True) -> str:
  """Converts an HF DeepSeek-V2/V3 directory to the Orbax layout of `orbax_io`; returns DST.

  src: config.json + model.safetensors or model.safetensors.index.json with its shards (bf16,
    fp32 or FP8 e4m3 with `weight_scale_inv`). The MTP layers present are converted.
  dtype: "bfloat16" | "float32" (FP8 dequantised) | "float8" (e4m3 + block scales kept).
  Raises CheckpointError (names file and tensor) or FileExistsError before anything is written
  at DST; DST appears only when complete.
  """
  if dtype not in DTYPES:
    raise UserError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
  src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
  if dst == src or dst.startswith(src + os.sep) or src.startswith(dst + os.sep):
    raise UserError(f"DST {dst} must not be SRC {src} or contain it or lie inside it")
  if os.path.lexists(dst) and not overwrite:
    raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
  cfg = ModelConfig.from_hf_config(src)
  ckpt = HFCheckpoint(src)
  try:
    depth = mtp_depth_present(ckpt, cfg)
    if depth < cfg.num_nextn_predict_layers:
      log.warning("%s: config.json names %d MTP layer(s), the checkpoint holds %d; converting %d",
                  src, cfg.num_nextn_predict_layers, depth, depth)
    cfg = cfg.replace(num_nextn_predict_layers=depth)
    rt = RuntimeConfig(param_dtype=DTYPES[dtype], dtype=DTYPES[dtype])
    abstract = abstract_model(cfg, rt)
    shapes, dtypes = param_shapes(abstract), param_dtypes(abstract)
    table = name_table(cfg, shapes)
    if ignore_unexpected:
      for n in [n for n in ckpt.names() if n not in table and not n.endswith(SCALE_SUFFIX)]:
        ckpt.location.pop(n)
        ckpt.location.pop(n + SCALE_SUFFIX, None)
    total = check_checkpoint(ckpt, table, shapes, ignore_unexpected=ignore_unexpected)
    q = cfg.quantization_config
    block = tuple(q.weight_block_size) if q else (128, 128)
    if dtype == "float8":
      stream = read_targets_fp8(ckpt, table, shapes, dtypes, block=block)
      if q is None:
        log.warning("%s has no FP8 quantization_config: --dtype float8 stores its weights in bf16", src)
    else:
      stream = ((t, v, None, None) for t, v in read_targets(ckpt, table, shapes, dtypes, block=block))
    sources: dict[str, list[str]] = {}
    for n, e in table.items():
      sources.setdefault(e.target, []).append(n)
    bar = _progress(total, progress)
    with OrbaxWriter(dst, overwrite=overwrite, workers=workers) as writer:
      for target, value, scale, _ in stream:
        writer.write(target, value, scale)
        del value, scale
        done = sum(_nbytes(ckpt, n) for n in sources[target])
        ckpt.close()  # unmap the shards: resident memory stays bounded by one target
        bar.update(done)
      files = {"config.json": _config_json(src, dtype)}
      manifest = {"dtype": dtype, "source": src, "num_nextn_predict_layers": depth,
                  "fp8": ({"weight_block_size": list(block), "scale_fmt": q.scale_fmt if q else None,
                           "layout": "checkpoint [..., out, in]"} if dtype == "float8" else None)}
      _copy_tokenizer(src, writer.tmp)
      out = writer.finish(manifest, files)
    bar.close()
  finally:
    ckpt.close()
  return out


def _nbytes(ckpt: HFCheckpoint, name: str) -> int:
  n = 0
  for t in (name, name + SCALE_SUFFIX):
    if t in ckpt.location:
      n += ckpt.shard(t).nbytes(t)
  return n


def _copy_tokenizer(src: str, dst: str) -> None:
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))


class _NoBar:
  def update(self, n):
    pass

  def close(self):
    pass


def _progress(total: int, enabled: bool):
  if not enabled:
    return _NoBar()
  from tqdm import tqdm
  return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert")
