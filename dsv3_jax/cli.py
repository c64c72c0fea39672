"""The `dsv3` command line. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when used."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("dsv3_jax.demo", "build a tiny checkpoint, load it and run it (no downloads)"),
    "convert": ("dsv3_jax.convert.cli", "HF safetensors checkpoint -> Orbax"),
    "export": ("dsv3_jax.convert.export_cli", "Orbax checkpoint -> HF safetensors"),
    "generate": ("dsv3_jax.inference.cli", "generate text from a checkpoint"),
    "train": ("dsv3_jax.train.cli", "train a model"),
    "plan": ("dsv3_jax.plan_cli", "compile a train/serve step for a TPU topology: memory verdict"),
}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in JAX")
  sub = parser.add_subparsers(dest="command", required=True)
  argv = sys.argv[1:] if argv is None else argv
  chosen = argv[0] if argv and argv[0] in SUBCOMMANDS else None
  for name, (module, help_text) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_text)
    if name == chosen:
      mod = importlib.import_module(module)
      mod.add_arguments(p)
      p.set_defaults(_run=mod.run)
  args = parser.parse_args(argv)
  return int(args._run(args) or 0)


if __name__ == "__main__":
  sys.exit(main())
