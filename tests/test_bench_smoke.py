"""Runs one bench script per family in its --smoke mode (CPU, tiny shapes, GPU Pallas kernels in
interpret mode, CUDA lowering of the kernels at the real shapes, torch/transformers baselines on
CPU, no torch.compile) and checks that it exits 0, prints its table with one row per case, and
writes its --markdown section; plus bench/common.py's table/ratio/section helpers against
hand-written expectations. Each script runs in a child process with JAX_PLATFORMS=cpu.

Families: the kernel benches (attention, mla_decode, matmul, grouped_matmul: one layout on
bench/common.py, whose kernels' numerics and CUDA lowering the kernel tests check) -> matmul.py;
serving -> decode.py; training -> train.py.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402

from tests.utils import FAST_COMPILE_FLAGS  # noqa: E402

# script -> (header cells the table must have, number of data rows, lines that must be printed)
CASES = {
    "matmul.py": (["ours", "ours+q", "deq+bf16", "bf16", "ours % peak", "ours/bf16", "err"], 1,
                  ["lowered for cuda: quantize_activations + fp8_matmul M 16384 K 7168 N 18432"]),
    "decode.py": (["batch", "ours tok/s", "+MTP forced head (acc)", "transformers tok/s",
                   "ours / tf", "ours % HBM (weights, est.)"], 1,
                  ["transformers DeepseekV3ForCausalLM, attn_implementation="]),
    "train.py": (["case", "tokens/s", "MFU", "vs transformers eager"], 2,
                 ["| jax (MTP on) |", "| transformers eager |"]),
}


def _table(out: str) -> tuple[list[str], list[list[str]]]:
  """The header cells and data rows of the last markdown table in `out`."""
  lines = [line for line in out.splitlines() if line.startswith("|")]
  start = max(i for i, line in enumerate(lines) if line.startswith("|---"))
  split = lambda line: [c.strip() for c in line.strip("|").split("|")]
  return split(lines[start - 1]), [split(line) for line in lines[start + 1:]]


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(CASES))
def test_smoke(script, tmp_path):
  header, nrows, expected_lines = CASES[script]
  md = tmp_path / "RESULTS.md"
  md.write_text("# Benchmark results\n\n## Other section\n\nkept\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         # compile time dominates these tiny CPU runs
         "XLA_FLAGS": FAST_COMPILE_FLAGS}
  proc = subprocess.run([sys.executable, f"bench/{script}", "--smoke", "--markdown", str(md)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  out = proc.stdout
  assert "SMOKE RUN" in out and "device: cpu" in out
  for line in expected_lines:
    assert line in out, (line, out[-3000:])
  cells, rows = _table(out)
  assert [h for h in header if h not in cells] == []
  assert len(rows) == nrows, out[-3000:]
  for row in rows:
    assert len(row) == len(cells)
    assert not any(c.startswith("err") or c == "timeout" for c in row), row
  text = md.read_text()
  assert "## Other section\n\nkept" in text
  assert text.count(f"bench/{script}") >= 1 and text.count("\n## ") == 2


def test_common_helpers(tmp_path, capsys):
  assert common.ratio(3.0, 2.0) == "1.50x"
  assert common.ratio("err (X)", 2.0) == "-" and common.ratio(1.0, 0.0) == "-"
  assert common.peak_fraction(395.0, 790.0) == "50.0%" and common.peak_fraction(None, 1) == "-"
  assert common.fmt(float("nan")) == "-" and common.fmt(1234.5, ",.0f") == "1,234"
  assert common.attempt(lambda: 1 / 0, verbose=False) == "err (ZeroDivisionError)"
  t = common.Table([("a", "A", "d"), ("b", "B", ".2f")])
  t.add({"a": 1, "b": 0.5})
  t.add({"a": 2, "b": None})
  assert t.markdown() == "| A | B |\n|---|---|\n| 1 | 0.50 |\n| 2 | - |\n"
  assert capsys.readouterr().out == t.markdown()
  path = tmp_path / "R.md"
  path.write_text("# R\n\n## x\n\nold\n\n## y\n\nkeep\n")
  common.update_results(str(path), "x", "new table\n")
  common.update_results(str(path), "z", "appended\n")
  common.update_results(str(path), "x", "newer table\n")
  text = path.read_text()
  assert re.search(r"^# R\n\n## x\n\n.*\n\nnewer table\n\n## y\n\nkeep\n\n\n## z\n\n.*\n\nappended\n$",
                   text), text
  assert "old" not in text and "new table" not in text


def test_time_call_counts_calls():
  import jax.numpy as jnp
  calls = []

  def f(x):
    calls.append(1)
    return jnp.asarray(x) + 1

  sec = common.time_call(f, (1,), warmup=2, iters=3, repeats=2)
  assert len(calls) == 2 + 3 * 2 and 0 <= sec < 1
