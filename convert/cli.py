"""`dsv3 convert SRC DST [--dtype bfloat16|float32|float8] [--group-mb M] [--overwrite]
[--ignore-unexpected] [--no-progress]`."""
from __future__ import annotations

import argparse
import logging
import sys



def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("src", metavar="SRC", help="HF checkpoint directory (config.json + "
                 "model.safetensors or model.safetensors.index.json with its shards)")
  p.add_argument("dst", metavar="DST", help="output directory (created; appears only when complete)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float8"],
                 help="stored parameter dtype; float8 keeps e4m3 weights with their block scales "
                      "(default bfloat16: FP8 blocks dequantised)")
  p.add_argument("--group-mb", type=float, default=512,
                 help="parameters are saved in groups of about this many MiB, one written while "
                      "the next is read (default 512; peak memory ~ 2 groups + the largest "
                      "parameter); an interrupted conversion resumes after the last saved group")
  p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
  p.add_argument("--ignore-unexpected", action="store_true",
                 help="skip tensors the model has no parameter for (default: error)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def estimate_output_bytes(src: str, dtype: str) -> int:
  """What `dsv3 convert SRC --dtype` writes, from the safetensors headers (no tensor read):
  every weight at the target dtype's width (float8: e4m3 weights stay 1 byte + their scales,
  others 2), plus 2% for Orbax metadata. 0 when SRC cannot be read (convert reports why)."""
  import math

  from dsv3_jax.checkpoint import SCALE_SUFFIX, HFCheckpoint
  try:
    ckpt = HFCheckpoint(src)
  except Exception:  # the conversion's own checks name the problem
    return 0
  width = {"bfloat16": 2, "float32": 4}.get(dtype)
  total = 0
  try:
    for name in ckpt.names():
      f = ckpt.shard(name)
      n = math.prod(f.shape(name))
      if name.endswith(SCALE_SUFFIX):
        total += f.nbytes(name) if width is None else 0
      else:
        total += n * (width or (1 if f.dtype(name).itemsize == 1 else 2))
  except Exception:
    return 0
  finally:
    ckpt.close()
  return int(total * 1.02)


def run(args: argparse.Namespace) -> int:
  import os

  from dsv3_jax import ui
  from dsv3_jax.convert.convert import convert
  from dsv3_jax.errors import check_free_space
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  if os.path.isdir(args.src) and not (os.path.lexists(args.dst) and not args.overwrite):
    check_free_space(os.path.dirname(os.path.abspath(args.dst)),
                     estimate_output_bytes(args.src, args.dtype), f"DST {args.dst}")
  from dsv3_jax.convert.orbax_io import staging_dir
  args.on_interrupt = (f"{args.dst} is not complete; the same command resumes (written so far: "
                       f"{staging_dir(args.dst)})")
  out = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                ignore_unexpected=args.ignore_unexpected, group_bytes=int(args.group_mb * (1 << 20)),
                progress=not args.no_progress and ui.progress_enabled())
  print(f"wrote {out}")
  return 0
