"""FP8 block-scaled matmul against XLA, on DeepSeek-V3 projection shapes (run on an accelerator).

For out[M, N] = x[M, K] . W[N, K]^T with the checkpoint's FP8 weights (e4m3, 128x128 block
scales) and K, N from DeepSeek-V3 ([M,7168]x[7168,2048], [M,2048]x[2048,7168],
[M,7168]x[7168,18432]), M from 128 to 16384, one row per case with TFLOP/s (2*M*N*K / time) of:

  ours      GPU: `fp8_matmul` (e4m3 x e4m3 on the tensor cores; activations quantised
            beforehand, as a fused model keeps them). TPU: `fp8_weight_matmul` (bf16 x, weights
            decoded in VMEM), the path a TPU model uses.
  ours+q    GPU only: `quantize_activations` + `fp8_matmul` (the quantisation kernel included).
  triton, mosaic  GPU only: `fp8_matmul` forced to gpu_impl="triton" / "mosaic" (Mosaic GPU,
            Hopper; "ours" is auto, i.e. Mosaic GPU on an H100, Triton where it cannot run).
  deq+bf16  XLA: dequantise W to bf16 inside the jitted step, then a bf16 matmul.
  bf16      XLA: a bf16 matmul with a bf16 W (what the FP8 path must beat).

then ours as a fraction of --peak (790 TFLOP/s: dense bf16 measured on the H100), the ratios
ours/bf16 and ours/deq+bf16, and err = max |ours - deq+bf16| / max |deq+bf16|, so a broken
kernel shows before its speed is trusted (GPU: includes the e4m3 rounding of the activations,
~2e-2; TPU: summation order only, ~1e-5). Each timing: --warmup calls, then --iters calls
enqueued back to back and one block_until_ready; the mean per call of the best of --repeats
(bench/common.py `time_call`).

  python bench/matmul.py [--quick] [--m 128 4096] [--markdown bench/RESULTS.md]
  python bench/matmul.py --smoke   (CPU: K=N=256, M=64, the GPU kernels in interpret mode, plus
                                    CUDA lowering of the kernels at the real shapes)
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (H100_BF16_TFLOPS, Table, add_timing_args, check_cuda_lowering,  # noqa: E402
                    peak_fraction, print_header, ratio, resolve_platform, save_table, time_call)

from dsv3_jax.kernels_pallas import (fp8_matmul, fp8_weight_matmul,  # noqa: E402
                                     quantize_activations)
from dsv3_jax.kernels_pallas.fp8 import dequantize  # noqa: E402

__all__ = ["make_operands", "run_case", "main"]

SHAPES = ((7168, 2048), (2048, 7168), (7168, 18432))  # (K, N)
M_ALL = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
M_QUICK = (128, 4096)
COLUMNS = (("K", "K", "d"), ("N", "N", "d"), ("M", "M", "d"), ("ours", "ours", ".1f"),
           ("triton", "triton", ".1f"), ("mosaic", "mosaic", ".1f"), ("ours+q", "ours+q", ".1f"),
           ("deq+bf16", "deq+bf16", ".1f"), ("bf16", "bf16", ".1f"),
           ("peak", "ours % peak", "s"), ("vs_bf16", "ours/bf16", "s"),
           ("vs_deq", "ours/deq+bf16", "s"), ("err", "err", ".1e"))


def make_operands(m: int, k: int, n: int, key):
  """x bf16 [m, k]; w8 e4m3 [n, k] with f32 block scales [ceil(n/128), ceil(k/128)]; the same
  weight dequantised to bf16."""
  kx, kw, ks = jax.random.split(key, 3)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  w8 = jnp.clip(jax.random.normal(kw, (n, k), jnp.float32) * 100, -448, 448)
  w8 = w8.astype(jnp.float8_e4m3fn)
  w_scale = jax.random.uniform(ks, (-(-n // 128), -(-k // 128)), jnp.float32, 0.5, 2.0) / 3200
  w_bf16 = dequantize(w8, w_scale).astype(jnp.bfloat16)
  return x, w8, w_scale, w_bf16


def _quant_and_matmul(kw: dict):
  def f(x, w, t):
    a, s = quantize_activations(x, **kw)
    return fp8_matmul(a, s, w, t, **kw)
  return f


def run_case(m: int, k: int, n: int, platform: str, opts) -> dict:
  """One table row: TFLOP/s of every column, ratios, % of peak and err."""
  x, w8, w_scale, w_bf16 = make_operands(m, k, n, jax.random.PRNGKey(m + k + n))
  timing = dict(warmup=opts.warmup, iters=opts.iters, repeats=opts.repeats)
  flops = 2.0 * m * n * k
  tflops = lambda f, *args: flops / time_call(f, args, **timing) / 1e12

  bf16 = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))))
  deq = jax.jit(lambda x, w8, s: jax.lax.dot_general(
      x, dequantize(w8, s).astype(jnp.bfloat16), (((1,), (1,)), ((), ()))))
  row = {"K": k, "N": n, "M": m}
  row["bf16"] = tflops(bf16, x, w_bf16)
  row["deq+bf16"] = tflops(deq, x, w8, w_scale)
  expected = deq(x, w8, w_scale)

  kw = dict(backend=opts.backend, platform=platform)
  if platform == "gpu":
    a, a_scale = jax.jit(lambda x: quantize_activations(x, **kw))(x)
    ours = jax.jit(lambda a, s, w, t: fp8_matmul(a, s, w, t, **kw))
    row["ours"] = tflops(ours, a, a_scale, w8, w_scale)
    got = ours(a, a_scale, w8, w_scale)
    for impl in ("triton", "mosaic"):
      flavour = jax.jit(lambda a, s, w, t, impl=impl: fp8_matmul(a, s, w, t, gpu_impl=impl, **kw))
      row[impl] = tflops(flavour, a, a_scale, w8, w_scale)
    row["ours+q"] = tflops(jax.jit(_quant_and_matmul(kw)), x, w8, w_scale)
  else:
    ours = jax.jit(lambda x, w, t: fp8_weight_matmul(x, w, t, **kw))
    row["ours"] = tflops(ours, x, w8, w_scale)
    row["ours+q"] = row["triton"] = row["mosaic"] = None
    got = ours(x, w8, w_scale)
  ref = np.asarray(expected, np.float32)
  row["err"] = float(np.max(np.abs(np.asarray(got, np.float32) - ref)) / np.max(np.abs(ref)))
  row["peak"] = peak_fraction(row["ours"], opts.peak)
  row["vs_bf16"] = ratio(row["ours"], row["bf16"])
  row["vs_deq"] = ratio(row["ours"], row["deq+bf16"])
  return row


def lowering_checks(shapes, m: int) -> None:
  """Lowers the GPU kernels (fp8_matmul, quantize + fp8_matmul) for CUDA at the real shapes."""
  sds = jax.ShapeDtypeStruct
  kw = dict(backend="pallas", platform="gpu")
  for k, n in shapes:
    kb, nb = -(-k // 128), -(-n // 128)
    a, a_s = sds((m, k), jnp.float8_e4m3fn), sds((m, kb), jnp.float32)
    w, w_s = sds((n, k), jnp.float8_e4m3fn), sds((nb, kb), jnp.float32)
    check_cuda_lowering(f"fp8_matmul M {m} K {k} N {n}",
                        lambda a, s, w, t: fp8_matmul(a, s, w, t, **kw), a, a_s, w, w_s)
    check_cuda_lowering(f"fp8_matmul mosaic M {m} K {k} N {n}",
                        lambda a, s, w, t: fp8_matmul(a, s, w, t, gpu_impl="mosaic", **kw),
                        a, a_s, w, w_s, marker="mosaic_gpu")
    check_cuda_lowering(f"quantize_activations + fp8_matmul M {m} K {k} N {n}",
                        _quant_and_matmul(kw), sds((m, k), jnp.bfloat16), w, w_s)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="M in {128, 4096} only")
  parser.add_argument("--m", type=int, nargs="*", help="override the list of M")
  parser.add_argument("--shapes", nargs="*", help="override the (K, N) list, as K,N")
  parser.add_argument("--peak", type=float, default=H100_BF16_TFLOPS,
                      help="TFLOP/s for the peak column")
  parser.add_argument("--platform", choices=("gpu", "tpu"), help="default: the jax backend")
  add_timing_args(parser, warmup=3, iters=20, repeats=3)
  opts = parser.parse_args(argv)

  shapes = [tuple(map(int, s.split(","))) for s in opts.shapes] if opts.shapes else SHAPES
  ms = opts.m or (M_QUICK if opts.quick else M_ALL)
  if opts.smoke:
    lowering_checks(shapes, max(ms))
    shapes, ms = [(256, 256)], [64]
    opts.warmup, opts.iters, opts.repeats = 0, 1, 1
  platform = resolve_platform(opts, "bench/matmul.py")
  ours_name = "fp8_matmul" if platform == "gpu" else "fp8_weight_matmul"
  print_header(f"FP8 block-scaled matmul, TFLOP/s; ours = {ours_name} (backend={opts.backend}); "
               f"% of {opts.peak:g} TFLOP/s peak", opts)
  table = Table(COLUMNS)
  for k, n in shapes:
    for m in ms:
      table.add(run_case(m, k, n, platform, opts))
  save_table(opts.markdown, "FP8 matmul (bench/matmul.py)", table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
