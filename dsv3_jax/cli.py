"""The `dsv3` command line. Each subcommand lives in its own module exposing
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when used.

Errors (one handler for every command):
  * `dsv3_jax.errors.UserError` (a bad flag, file, config field, tensor): one line
    `dsv3 CMD: error: MESSAGE` on stderr, exit status 2;
  * `OSError` (missing path, read-only destination, full disk; also when Orbax reports one as
    a tensorstore error): one line naming the path, status 2;
  * Ctrl-C: one line `dsv3 CMD: interrupted` (plus what was saved / how to resume, when the
    command says), status 130;
  * anything else is a bug and keeps its traceback. `--debug` shows tracebacks for all of them and
    leaves the libraries' (Orbax, absl) logging on.
Global flags go before or after the command: --debug, --quiet, --log-format plain|rich.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "demo": ("dsv3_jax.demo", "build a tiny checkpoint, load it and run it (no downloads)"),
    "convert": ("dsv3_jax.convert.cli", "HF safetensors checkpoint -> Orbax"),
    "export": ("dsv3_jax.convert.export_cli", "Orbax checkpoint -> HF safetensors"),
    "generate": ("dsv3_jax.inference.cli", "generate text from a checkpoint"),
    "serve": ("dsv3_jax.serving.cli", "OpenAI-compatible HTTP server (continuous batching)"),
    "train": ("dsv3_jax.train.cli", "train a model"),
    "sft": ("dsv3_jax.rl.sft_cli", "supervised fine-tuning on chat JSONL (assistant tokens only)"),
    "grpo": ("dsv3_jax.rl.cli", "GRPO with verifiable rewards (R1-Zero demo: --task arith)"),
    "eval": ("dsv3_jax.eval_cli", "perplexity of a checkpoint on a token file"),
    "tokenize": ("dsv3_jax.tokenize_cli", "text / jsonl -> a uint32 token file for `dsv3 train`"),
    "configs": ("dsv3_jax.configs_cli", "list the presets, show one as JSON, or check a config.json"),
    "plan": ("dsv3_jax.plan_cli", "compile a train/serve step for a TPU topology: memory verdict"),
}

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _version() -> str:
  try:
    from importlib.metadata import version
    return version("dsv3-jax")
  except Exception:  # running from a source tree that is not installed
    return "unknown (not installed)"


def _add_global_flags(p: argparse.ArgumentParser, top: bool) -> None:
  # On a subcommand the defaults are SUPPRESS, so `dsv3 --debug generate` is not reset there.
  d = (lambda v: v) if top else (lambda v: argparse.SUPPRESS)
  p.add_argument("--debug", action="store_true", default=d(False),
                 help="show tracebacks and the libraries' logs on errors")
  p.add_argument("--quiet", action="store_true", default=d(False),
                 help="no progress bars or status lines (results and errors only)")
  p.add_argument("--log-format", choices=("auto", "plain", "rich"), default=d("auto"),
                 help="progress as plain lines or live bars (default auto: bars on a terminal)")


def _accelerator_free_host(dev: str = "/dev") -> bool:
  """True when this host has no TPU, NVIDIA or AMD device nodes (`accel*`, `vfio/N`, `nvidia*`,
  `kfd`). There, a jax with libtpu installed (the test extra, or to run `dsv3 plan`) would still
  try the TPU backend and print a screen of libtpu errors before falling back to the CPU."""
  import glob
  import os
  patterns = ("accel[0-9]*", "vfio/[0-9]*", "nvidia[0-9]*", "kfd")
  return not any(glob.glob(os.path.join(dev, p)) for p in patterns)


def _default_platform() -> None:
  """Pins jax to the CPU on a host without accelerators unless the user chose (`JAX_PLATFORMS`).
  `dsv3 plan` compiles for TPU through the topology API, which does not need the TPU backend."""
  import os
  if not _accelerator_free_host():
    return
  # libtpu still starts for `dsv3 plan`'s topology; with no TPU VM metadata to read it prints
  # its worker-hostname errors unless told there is one local worker.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  if "JAX_PLATFORMS" not in os.environ:
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported by the package, backends not started yet: set it there too
      sys.modules["jax"].config.update("jax_platforms", "cpu")


def _quiet_libraries() -> None:
  """Orbax and absl log warnings (and a stack of messages on every failed save) that mean nothing
  to a user of the CLI; errors still reach the user through the one-line handler."""
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    absl_logging.set_stderrthreshold("fatal")
  except ImportError:
    pass
  for name in ("absl", "orbax", "orbax.checkpoint", "jax._src.xla_bridge"):
    logging.getLogger(name).setLevel(logging.CRITICAL)


class _HelpFormatter(argparse.HelpFormatter):
  """Appends "(default: X)" to an option's help unless the help already speaks of its default or
  the default is None / False (a flag or an optional value)."""

  def _get_help_string(self, action):
    h = action.help or ""
    d = action.default
    if ("default" in h.lower() or d is None or d is False or d is argparse.SUPPRESS
        or not action.option_strings):
      return h
    return f"{h} (default: {d})"


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
  """The parser, with the arguments of subcommand `chosen` only (the others are not imported)."""
  parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in JAX")
  parser.add_argument("--version", action="version", version=f"dsv3 {_version()}")
  _add_global_flags(parser, top=True)
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for name, (module, help_text) in SUBCOMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text,
                       formatter_class=_HelpFormatter)
    if name == chosen:
      mod = importlib.import_module(module)
      mod.add_arguments(p)
      _add_global_flags(p, top=False)
      p.set_defaults(_run=mod.run)
  return parser


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  _default_platform()
  chosen = next((a for a in argv if a in SUBCOMMANDS), None)
  args = build_parser(chosen).parse_args(argv)
  from dsv3_jax import ui
  ui.configure(args)
  if not args.debug:
    _quiet_libraries()
  prefix = f"dsv3 {args.command}"
  from dsv3_jax.errors import UserError, as_os_error, describe_os_error
  try:
    return int(args._run(args) or 0)
  except KeyboardInterrupt:
    if args.debug:
      raise
    hint = getattr(args, "on_interrupt", None)
    hint = hint() if callable(hint) else hint
    print(f"{prefix}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
    return EXIT_INTERRUPTED
  except UserError as e:
    if args.debug:
      raise
    print(f"{prefix}: error: {_one_line(str(e))}", file=sys.stderr)
    return EXIT_USER_ERROR
  except Exception as e:  # a filesystem error (also as Orbax/tensorstore reports one), else a bug
    os_error = as_os_error(e)
    if args.debug or os_error is None:
      raise
    print(f"{prefix}: error: {_one_line(describe_os_error(os_error))}", file=sys.stderr)
    return EXIT_USER_ERROR


def _one_line(msg: str) -> str:
  return " ".join(msg.split()) or "(no message)"


if __name__ == "__main__":
  sys.exit(main())
