"""Helpers shared by the GPU bench scripts in bench/: timing, the result table, H100 peaks, the
device header, CUDA lowering checks for --smoke runs, and bench/RESULTS.md sections.

The scripts import it as a sibling module (`from common import ...`): `python bench/X.py` puts
bench/ first on sys.path, and each script also inserts its own folder there so that importing
the script from elsewhere (tests) works too; tests/utils.py imports it the same way. bench/ is
deliberately not a package.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import re
import statistics
import sys
import time
from typing import Any, Callable, Sequence

__all__ = [
    "H100_BF16_TFLOPS", "H100_HBM_TBS", "time_call", "median_call", "Table", "fmt", "ratio",
    "peak_fraction", "attempt", "device_header", "print_header", "add_timing_args",
    "kernel_options", "lower_for_cuda", "check_cuda_lowering", "update_results",
    "transformers_config", "torch_sync", "save_table", "resolve_platform", "hlo_collectives",
]

# Dense bf16 matmul rate and device-to-device copy rate measured on the H100 (ARCHITECTURE.md).
H100_BF16_TFLOPS = 790.0
H100_HBM_TBS = 3.0


def time_call(fn: Callable, args: Sequence[Any] = (), *, warmup: int, iters: int,
              repeats: int) -> float:
  """Seconds per call of `fn(*args)` (a jitted function returning jax arrays).

  `warmup` calls (compilation included) each followed by block_until_ready, then `repeats`
  batches of `iters` calls enqueued back to back with one block_until_ready per batch; returns
  the mean per call of the fastest batch.
  """
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  best = math.inf
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    out = None
    for _ in range(max(iters, 1)):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / max(iters, 1))
  return best


def median_call(step: Callable[[], Any], *, warmup: int, iters: int) -> float:
  """Median seconds of `step()` over `iters` calls after `warmup` calls; `step` must itself
  wait for its work to finish (block_until_ready / torch.cuda.synchronize)."""
  for _ in range(warmup):
    step()
  times = []
  for _ in range(max(iters, 1)):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def fmt(x: Any, spec: str = ".1f") -> str:
  """A table cell: "-" for None/NaN, strings unchanged (e.g. "err (XlaRuntimeError)"), numbers
  with `spec`."""
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  if isinstance(x, str):
    return x
  return format(x, spec)


def _number(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def ratio(x: Any, y: Any) -> str:
  """"1.23x" for x / y when both are finite numbers (y != 0), else "-"."""
  return f"{x / y:.2f}x" if _number(x) and _number(y) and y else "-"


def peak_fraction(x: Any, peak: float) -> str:
  """x as a percentage of `peak` (same unit), "-" when x is not a number."""
  return f"{100.0 * x / peak:.1f}%" if _number(x) else "-"


def attempt(fn: Callable[[], float], *, verbose: bool = True) -> float | str:
  """fn() or, when it raises, "err (ExceptionType)" (one failing baseline or case must not stop
  the table; the reason is printed to stderr)."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 -- reported in the table and on stderr
    if verbose:
      print(f"[err] {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
            file=sys.stderr, flush=True)
    return f"err ({type(e).__name__})"


class Table:
  """A markdown table printed as it fills: the header on creation, one line per `add`.

  columns: (key, title, spec) triples; a row is a dict keyed by `key`, cells formatted by `fmt`.
  `markdown()` returns the whole table (for bench/RESULTS.md).
  """

  def __init__(self, columns: Sequence[tuple[str, str, str]], *, out=None):
    self.columns = list(columns)
    self.rows: list[dict] = []
    self.out = out or sys.stdout
    for line in self._head():
      print(line, file=self.out, flush=True)

  def _head(self) -> list[str]:
    return ["| " + " | ".join(t for _, t, _ in self.columns) + " |",
            "|" + "---|" * len(self.columns)]

  def _line(self, row: dict) -> str:
    return "| " + " | ".join(fmt(row.get(k), spec) for k, _, spec in self.columns) + " |"

  def add(self, row: dict) -> None:
    """Prints and keeps one row."""
    self.rows.append(row)
    print(self._line(row), file=self.out, flush=True)

  def markdown(self) -> str:
    """The header and every row, newline-terminated."""
    return "\n".join(self._head() + [self._line(r) for r in self.rows]) + "\n"


def device_header() -> str:
  """"device: NVIDIA H100 80GB HBM3 (gpu), jax 0.11.2, python 3.12.3"."""
  import jax
  d = jax.devices()[0]
  return (f"device: {d.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
          f"python {sys.version.split()[0]}")


def print_header(description: str, args: argparse.Namespace | None = None) -> None:
  """Prints the device header, then `description` (and a note in --smoke runs)."""
  print(device_header())
  if args is not None and getattr(args, "smoke", False):
    print("SMOKE RUN: tiny shapes on CPU, kernels in Pallas interpret mode; timings meaningless")
  print(description + "\n", flush=True)


def add_timing_args(p: argparse.ArgumentParser, *, warmup: int = 3, iters: int = 10,
                    repeats: int = 3, markdown: bool = True, backend: str | None = "pallas"):
  """Adds --warmup/--iters/--repeats, --smoke, and optionally --markdown and --backend."""
  p.add_argument("--warmup", type=int, default=warmup, help="untimed calls (compile included)")
  p.add_argument("--iters", type=int, default=iters, help="calls per timed batch")
  p.add_argument("--repeats", type=int, default=repeats, help="timed batches; the best is kept")
  p.add_argument("--smoke", action="store_true",
                 help="CPU check of the whole script: tiny shapes, kernels in interpret mode, "
                      "plus CUDA lowering of the kernels at the real shapes; timings meaningless")
  if backend is not None:
    p.add_argument("--backend", default=backend,
                   help="kernel backend for ours: pallas | auto | reference | interpret")
  if markdown:
    p.add_argument("--markdown", metavar="PATH",
                   help="write the table as a section of this file (e.g. bench/RESULTS.md), "
                        "replacing the section of the same title if present")


def kernel_options(args: argparse.Namespace) -> dict:
  """backend / platform keywords for our kernels: the GPU kernel in interpret mode under
  --smoke, else --backend on the current platform."""
  if getattr(args, "smoke", False):
    return {"backend": "interpret", "platform": "gpu"}
  return {"backend": args.backend, "platform": None}


def lower_for_cuda(fn: Callable, *args) -> str:
  """StableHLO text of jit(fn) lowered for CUDA (works on a CPU-only jaxlib); args may be
  jax.ShapeDtypeStruct, so nothing is allocated."""
  import jax
  from dsv3_jax.kernels_pallas.backend import gpu_lowering_target
  with gpu_lowering_target("cuda"):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def check_cuda_lowering(name: str, fn: Callable, *args, marker: str = "triton") -> int:
  """Lowers fn for CUDA (the GPU Pallas kernels through Triton, as the H100 run will) and
  prints how many `marker` custom calls it holds; raises when there are none."""
  t0 = time.perf_counter()
  n = lower_for_cuda(fn, *args).count(marker)
  if n == 0:
    raise RuntimeError(f"{name}: CUDA lowering holds no {marker!r} call (the kernel was not used)")
  print(f"lowered for cuda: {name}: {n} {marker} call(s) ({time.perf_counter() - t0:.1f} s)",
        flush=True)
  return n


def update_results(path: str, title: str, body: str) -> None:
  """Writes `## {title}` followed by `body` into the markdown file `path`: replaces the section
  of that exact title (up to the next `## ` heading) if present, else appends it. Written to a
  temporary file and renamed, so a failure leaves the file as it was."""
  text = ""
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  section = f"## {title}\n\n{stamp} · `{' '.join(['python'] + sys.argv)}`\n\n{body.rstrip()}\n"
  pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(text):
    text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
  else:
    text = (text.rstrip() + "\n\n\n" if text.strip() else "") + section
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def transformers_config(cfg) -> dict:
  """config.json fields of transformers' DeepseekV3ForCausalLM for our ModelConfig `cfg`: no
  MTP layer (transformers has none), no quantization_config, and num_key_value_heads set to
  the head count (transformers' DeepseekV3Config defaults it to 128, which breaks its attention
  for any other head count; ModelConfig.to_hf_config() does not write it)."""
  hf = dict(cfg.to_hf_config())
  hf.pop("quantization_config", None)
  hf.update(num_nextn_predict_layers=0, num_key_value_heads=cfg.num_attention_heads)
  return hf


def torch_sync(device: str) -> None:
  """Waits for the queued torch work on `device` ("cuda" or "cpu")."""
  import torch
  if str(device).startswith("cuda"):
    torch.cuda.synchronize()


def save_table(path: str | None, title: str, table: Table) -> None:
  """`update_results(path, f"{title} on {device kind}", table.markdown())`; nothing when path is
  None (no --markdown)."""
  if path:
    import jax
    update_results(path, f"{title} on {jax.devices()[0].device_kind}", table.markdown())


def resolve_platform(args: argparse.Namespace, script: str) -> str:
  """Kernel platform ("gpu" / "tpu") from args.platform or the jax backend; under --smoke the
  GPU kernels in interpret mode (sets args.backend, args.platform). Exits on a plain CPU."""
  import jax
  if getattr(args, "smoke", False):
    args.backend, args.platform = "interpret", "gpu"
  backend = jax.default_backend()
  platform = args.platform or ("gpu" if backend in ("gpu", "cuda", "rocm") else backend)
  if platform not in ("gpu", "tpu"):
    raise SystemExit(f"{script} needs a GPU or TPU (jax backend is {backend!r}); use --smoke")
  return platform


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8}


def hlo_collectives(hlo_text: str, ops=("all-to-all", "ragged-all-to-all")):
  """Collectives of a compiled module's HLO text (`jit(f).lower(...).compile().as_text()`), for
  bench/moe_ep.py and the expert-parallel tests (`tests.utils` re-exports it); `dsv3 plan`
  counts collectives by kind with `dsv3_jax.plan.count_collectives`.

  Returns [(op, [(dtype, dims), ...] result shapes, bytes)] per instruction; for all-to-all the
  result shapes equal the operand shapes (XLA may split one tiled all-to-all into S operands).
  `ops` names the HLO opcodes to collect (e.g. add "all-reduce", "all-gather").
  """
  out = []
  for line in hlo_text.splitlines():
    for op in ops:
      m = re.match(rf"\s*(?:ROOT )?%[\w.-]+ = (.*?) {re.escape(op)}(?:-start)?\(", line)
      if m:
        shapes = [(t, tuple(int(d) for d in dims.split(",") if d))
                  for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))]
        nbytes = sum(math.prod(d) * _DTYPE_BYTES.get(t, 4) for t, d in shapes)
        out.append((op, shapes, nbytes))
        break
  return out
