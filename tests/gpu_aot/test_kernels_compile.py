"""Every GPU Pallas kernel compiles for an H100 (sm_90a) on CPU with the intended custom call and
no ptxas register spills (deviceless XLA:GPU AOT, `bench/gpu_aot.py`).

Each case (DeepSeek-V3 shapes; flavour selected explicitly with gpu_impl=) is compiled to a cubin:
the test checks that the program holds exactly the expected number of Triton or Mosaic GPU
custom calls (none of the other flavour), and that ptxas, run on every Pallas kernel of the
program, reports 0 bytes of spill stores. ptxas reports come from MOSAIC_GPU_DUMP_PTXAS=1 (Mosaic
GPU; a kernel already compiled earlier in the process is cached and not reported again) and from
ptxas -v on the PTX XLA dumps (Triton).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import gpu_aot  # noqa: E402


@pytest.mark.parametrize("case", gpu_aot.CASES, ids=lambda c: c.name)
def test_kernel_compiles_for_sm90a(case):
  res = gpu_aot.run_case(case)
  other = gpu_aot.MOSAIC if case.flavour == gpu_aot.TRITON else gpu_aot.TRITON
  assert (res.calls[case.flavour], res.calls[other]) == (case.calls, 0), res.calls
  reports = gpu_aot.kernel_reports(res)
  if case.flavour == gpu_aot.TRITON:  # XLA compiles every Triton kernel anew
    assert len(reports) == (case.calls if res.ptx_dumped else 0), reports
  else:  # Mosaic GPU: a fresh kernel reports; each Mosaic kernel has a case of its own first
    assert reports or res.smem, "no Mosaic GPU kernel was compiled"
    assert len(res.smem) == case.calls, res.smem
  assert all(p.spill_stores == 0 for p in reports), reports
  assert all(0 < p.registers <= 255 for p in reports), reports
