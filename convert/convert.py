"""HF safetensors directory -> converted Orbax directory, streaming groups of parameters.

The parameter list comes from the abstract model (`name_table(cfg, param_shapes(abstract))`), so
the converter, the loader and the exporter share one table and one reading engine
(`dsv3_jax.checkpoint.read_targets`). Memory: targets (one parameter of one layer, routed experts
stacked into [E, ...]) are read into a group of about `group_bytes`, saved with one Orbax partial
save and dropped; the source shards are memory-mapped and unmapped after every target, so peak
RSS is about two groups plus the largest parameter, not the model size.

dtype "bfloat16" / "float32": FP8 blocks are dequantised (weight * scale_inv per block, partial
edge blocks, float32 or power-of-two ue8m0 scales alike) and cast. dtype "float8": e4m3 weights
are kept bit-exactly with their float32 block scales in the checkpoint's [out, in] layout
(see `dsv3_jax.param_tree`); tensors that are not FP8 in the source (norms, embeddings, lm_head, mlp.gate,
the router bias) are stored as in the bf16 model.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import jax.numpy as jnp
import numpy as np

from dsv3_jax.checkpoint import (SCALE_SUFFIX, TOKENIZER_FILES, HFCheckpoint, _dequant_ours,
                                 check_checkpoint, mtp_depth_present, name_table, read_targets)
from dsv3_jax.config import ModelConfig, RuntimeConfig
from dsv3_jax.convert.orbax_io import TreeWriter
from dsv3_jax.errors import UserError
from dsv3_jax.param_tree import fp8_paths
from dsv3_jax.pretrained import abstract_model, has_fp8_form, param_dtypes, param_shapes

__all__ = ["DTYPES", "convert", "TOKENIZER_FILES", "GROUP_BYTES"]

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float8": jnp.bfloat16}
GROUP_BYTES = 512 << 20


def _config_json(src: str, dtype: str) -> str:
  with open(os.path.join(src, "config.json")) as f:
    raw = json.load(f)
  if dtype != "float8":
    raw.pop("quantization_config", None)  # the stored weights are no longer quantised
  return json.dumps(raw, indent=2)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "bfloat16",
            overwrite: bool = False, ignore_unexpected: bool = False, progress: bool = True,
            group_bytes: int = GROUP_BYTES) -> str:
  """Converts an HF DeepSeek-V2/V3 directory into DST (the layout of `orbax_io`: one Orbax
  PyTree checkpoint of the parameter tree, `dsv3_jax.param_tree`); returns DST.

  src: config.json + model.safetensors or model.safetensors.index.json with its shards (bf16,
    fp32 or FP8 e4m3 with `weight_scale_inv`). The MTP layers present are converted.
  dtype: "bfloat16" | "float32" (FP8 dequantised) | "float8" (e4m3 + block scales kept).
  group_bytes: parameters are saved in groups of about this many bytes (one Orbax partial save
    each, written in the background while the next group is read; the unit of resumption).
    Peak memory ~ two groups + one parameter.
  Raises CheckpointError (names file and tensor) or FileExistsError before anything is written.
  DST appears only when complete; an interrupted conversion resumes when run again with the
  same arguments (the parameters already written are not read or written again).
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
    total = check_checkpoint(ckpt, table, shapes, ignore_unexpected=ignore_unexpected)
    q = cfg.quantization_config
    block = tuple(q.weight_block_size) if q else (128, 128)
    sources: dict[str, list[str]] = {}
    for n, e in table.items():
      sources.setdefault(e.target, []).append(n)
    job = {"source": src, "dtype": dtype, "ignore_unexpected": ignore_unexpected,
           "num_nextn_predict_layers": depth}
    writer = TreeWriter(dst, job, overwrite=overwrite)
    try:
      skip = frozenset(t for t in sources if t in writer.done or set(fp8_paths(t)) <= writer.done)
      if skip:
        log.warning("%s: resuming an interrupted conversion (%d of %d parameters already written)",
                    dst, len(skip), len(sources))
      if dtype == "float8" and q is None:
        log.warning("%s has no FP8 quantization_config: --dtype float8 stores its weights in bf16", src)
      stream = read_targets(ckpt, table, shapes, dtypes, block=block, keep_fp8=dtype == "float8",
                            skip=skip)
      bar = _progress(total, progress)
      bar.update(sum(_nbytes(ckpt, n) for t in skip for n in sources[t]))
      group: dict[str, np.ndarray] = {}
      size = 0
      for target, value, scale in stream:
        if scale is None:
          group[target] = value
        elif has_fp8_form(abstract, target):
          vp, sp = fp8_paths(target)
          group[vp], group[sp] = value, scale
        else:  # stored FP8 but the model has no FP8 form for it (e.g. a quantised router)
          group[target] = _dequant_ours(value, scale, block).astype(dtypes[target])
        size += value.nbytes + (0 if scale is None else scale.nbytes)
        del value, scale
        if size >= group_bytes:
          writer.write(group)
          group, size = {}, 0
        ckpt.close()  # unmap the shards: resident memory stays bounded by the group
        bar.update(sum(_nbytes(ckpt, n) for n in sources[target]))
      if group:
        writer.write(group)
      del group
      files = {"config.json": _config_json(src, dtype)}
      manifest = {"dtype": dtype, "source": src, "num_nextn_predict_layers": depth,
                  "fp8": ({"weight_block_size": list(block), "scale_fmt": q.scale_fmt if q else None,
                           "layout": "checkpoint [..., out, in]"} if dtype == "float8" else None)}
      _copy_tokenizer(src, writer.tmp)
      out = writer.finish(manifest, files)
    except BaseException:
      writer.stop()
      raise
    bar.close()
  finally:
    ckpt.close()
  return out


def _nbytes(ckpt: HFCheckpoint, name: str) -> int:
  n = 0
  for t in (name, name + SCALE_SUFFIX):
    if t in ckpt:
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
