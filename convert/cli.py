"""`dsv3 convert SRC DST [--dtype bfloat16|float32|float8] [--group-mb M] [--overwrite]
[--ignore-unexpected] [--no-progress]`."""
from __future__ import annotations

import argparse
import logging
import sys

from dsv3_jax.checkpoint import CheckpointError
from dsv3_jax.safetensors_io import SafetensorsError


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


def run(args: argparse.Namespace) -> int:
  from dsv3_jax.convert.convert import convert
  from dsv3_jax.convert.orbax_io import ConversionBusy, staging_dir
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
  try:
    out = convert(args.src, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                  ignore_unexpected=args.ignore_unexpected, group_bytes=int(args.group_mb * (1 << 20)),
                  progress=not args.no_progress)
  except (CheckpointError, SafetensorsError, FileExistsError, FileNotFoundError, ValueError,
          ConversionBusy) as e:
    print(f"dsv3 convert: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"\ndsv3 convert: interrupted; run the same command again to resume (written so far: "
          f"{staging_dir(args.dst)})", file=sys.stderr)
    return 130
  print(f"wrote {out}")
  return 0
