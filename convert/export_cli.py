"""`dsv3 export SRC OUT [--dtype bfloat16|float32|float8] [--max-shard-gb G] [--overwrite]
[--no-progress]`: a converted (Orbax) directory or a training run / step back to HF safetensors
in the official names."""
from __future__ import annotations

import argparse


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
  import os

  from dsv3_jax import ui
  from dsv3_jax.convert.export import export
  from dsv3_jax.errors import check_free_space
  if os.path.isdir(args.src) and not (os.path.lexists(args.out) and not args.overwrite):
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.src) for f in fs)
    # bf16/float8 exports are about the stored size (bf16 or e4m3 + scales), float32 twice it
    check_free_space(os.path.dirname(os.path.abspath(args.out)),
                     stored * (2 if args.dtype == "float32" else 1), f"OUT {args.out}")
  args.on_interrupt = f"{args.out} is not complete; rerun the same command"
  out = export(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite,
               max_shard_bytes=int(args.max_shard_gb * (1 << 30)),
               progress=not args.no_progress and ui.progress_enabled())
  print(f"wrote {out}")
  return 0
