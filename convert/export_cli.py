"""`dsv3 export SRC OUT [--dtype bfloat16|float32|float8] [--max-shard-gb G] [--overwrite]
[--no-progress]`: a converted (Orbax) directory or a training run / step back to HF safetensors
in the official names."""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("src", metavar="SRC", help="directory written by `dsv3 convert`, or a `dsv3 "
                 "train` run directory (its latest step) or step directory (RUN/checkpoints/STEP)")
  p.add_argument("out", metavar="OUT", help="output HF directory (appears only when complete)")
  p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float8"],
                 help="bfloat16 (default), float32, or float8 (official e4m3 + weight_scale_inv)")
  p.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit (default 5)")
  p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
  from dsv3_jax.convert.export import export
  try:
    out = export(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite,
                 max_shard_bytes=int(args.max_shard_gb * (1 << 30)), progress=not args.no_progress)
  except (FileExistsError, FileNotFoundError, ValueError) as e:
    print(f"dsv3 export: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}")
  return 0
