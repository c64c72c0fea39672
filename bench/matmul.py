"""FP8 block-scaled matmul against XLA, on DeepSeek-V3 projection shapes (run on an accelerator).

For out[M, N] = x[M, K] . W[N, K]^T with the checkpoint's FP8 weights (e4m3, 128x128 block
scales) and K, N from DeepSeek-V3 ([M,7168]x[7168,2048], [M,2048]x[2048,7168],
[M,7168]x[7168,18432]), M from 128 to 16384, one row per case with TFLOP/s (2*M*N*K / time) of:

  ours      GPU: `fp8_matmul` (e4m3 x e4m3 on the tensor cores; activations quantised
            beforehand, as a fused model keeps them). TPU: `fp8_weight_matmul` (bf16 x, weights
            decoded in VMEM), the path a TPU model uses.
  ours+q    GPU only: `quantize_activations` + `fp8_matmul` (the quantisation kernel included).
  deq+bf16  XLA: dequantise W to bf16 inside the jitted step, then a bf16 matmul.
  bf16      XLA: a bf16 matmul with a bf16 W (what the FP8 path must beat).

then ours as a fraction of --peak (790 TFLOP/s: dense bf16 measured on the H100), the ratios
ours/bf16 and ours/deq+bf16, and err = max |ours - deq+bf16| / max |deq+bf16|, so a broken
kernel shows before its speed is trusted (GPU: includes the e4m3 rounding of the activations,
~2e-2; TPU: summation order only, ~1e-5). Each timing: --warmup calls, then --iters calls
enqueued back to back and one block_until_ready; the mean per call of the best of --repeats.

  python bench/matmul.py [--quick] [--m 128 4096] [--markdown bench/RESULTS.md]
  python bench/matmul.py --backend interpret --platform gpu --shapes 256,256 --m 64 \
      --iters 1 --repeats 1 --warmup 0      (a CPU smoke run of the script itself)
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.kernels_pallas import fp8_matmul, fp8_weight_matmul, quantize_activations
from dsv3_jax.kernels_pallas.fp8 import dequantize

SHAPES = ((7168, 2048), (2048, 7168), (7168, 18432))  # (K, N)
M_ALL = (128, 256, 512, 1024, 2048, 4096, 8192, 16384)
M_QUICK = (128, 4096)


def time_call(f, args, *, warmup: int, iters: int, repeats: int) -> float:
  """Seconds per call: best over `repeats` of (iters calls back to back, then one sync)."""
  for _ in range(warmup):
    jax.block_until_ready(f(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = f(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / iters)
  return best


def make_operands(m: int, k: int, n: int, key):
  kx, kw, ks = jax.random.split(key, 3)
  x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
  w8 = jnp.clip(jax.random.normal(kw, (n, k), jnp.float32) * 100, -448, 448)
  w8 = w8.astype(jnp.float8_e4m3fn)
  w_scale = jax.random.uniform(ks, (-(-n // 128), -(-k // 128)), jnp.float32, 0.5, 2.0) / 3200
  w_bf16 = dequantize(w8, w_scale).astype(jnp.bfloat16)
  return x, w8, w_scale, w_bf16


def run_case(m: int, k: int, n: int, platform: str, opts) -> dict:
  x, w8, w_scale, w_bf16 = make_operands(m, k, n, jax.random.PRNGKey(m + k + n))
  timing = dict(warmup=opts.warmup, iters=opts.iters, repeats=opts.repeats)
  flops = 2.0 * m * n * k

  bf16 = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))))
  deq = jax.jit(lambda x, w8, s: jax.lax.dot_general(
      x, dequantize(w8, s).astype(jnp.bfloat16), (((1,), (1,)), ((), ()))))
  row = {"K": k, "N": n, "M": m}
  row["bf16"] = flops / time_call(bf16, (x, w_bf16), **timing) / 1e12
  row["deq+bf16"] = flops / time_call(deq, (x, w8, w_scale), **timing) / 1e12
  expected = deq(x, w8, w_scale)

  if platform == "gpu":
    kw = dict(backend=opts.backend, platform=platform)
    a, a_scale = jax.jit(lambda x: quantize_activations(x, **kw))(x)
    ours = jax.jit(lambda a, s, w, t: fp8_matmul(a, s, w, t, **kw))
    row["ours"] = flops / time_call(ours, (a, a_scale, w8, w_scale), **timing) / 1e12
    got = ours(a, a_scale, w8, w_scale)

    def quant_and_matmul(x, w, t):
      a, s = quantize_activations(x, **kw)
      return fp8_matmul(a, s, w, t, **kw)

    row["ours+q"] = flops / time_call(jax.jit(quant_and_matmul), (x, w8, w_scale),
                                      **timing) / 1e12
  else:
    ours = jax.jit(lambda x, w, t: fp8_weight_matmul(x, w, t, backend=opts.backend,
                                                    platform=platform))
    row["ours"] = flops / time_call(ours, (x, w8, w_scale), **timing) / 1e12
    row["ours+q"] = float("nan")
    got = ours(x, w8, w_scale)
  ref = np.asarray(expected, np.float32)
  row["err"] = float(np.max(np.abs(np.asarray(got, np.float32) - ref)) / np.max(np.abs(ref)))
  row["peak"] = row["ours"] / opts.peak
  row["vs_bf16"] = row["ours"] / row["bf16"]
  row["vs_deq"] = row["ours"] / row["deq+bf16"]
  return row


COLUMNS = (("K", 6, "d"), ("N", 6, "d"), ("M", 6, "d"), ("ours", 8, ".1f"),
           ("ours+q", 8, ".1f"), ("deq+bf16", 9, ".1f"), ("bf16", 8, ".1f"), ("peak", 6, ".2f"),
           ("vs_bf16", 8, ".2f"), ("vs_deq", 7, ".2f"), ("err", 8, ".1e"))


def format_row(row: dict) -> str:
  return " ".join(f"{row[name]:>{width}{spec}}" for name, width, spec in COLUMNS)


def header() -> str:
  return " ".join(f"{name:>{width}}" for name, width, _ in COLUMNS)


def append_markdown(path: str, title: str, rows: list[dict]) -> None:
  with open(path, "a") as f:
    f.write(f"\n## {title}\n\n| " + " | ".join(name for name, _, _ in COLUMNS) + " |\n")
    f.write("|" + "---|" * len(COLUMNS) + "\n")
    for row in rows:
      f.write("| " + " | ".join(f"{row[name]:{spec}}" for name, _, spec in COLUMNS) + " |\n")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="M in {128, 4096} only")
  parser.add_argument("--m", type=int, nargs="*", help="override the list of M")
  parser.add_argument("--shapes", nargs="*", help="override the (K, N) list, as K,N")
  parser.add_argument("--peak", type=float, default=790.0, help="TFLOP/s for the peak column")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--backend", default="pallas",
                      help="kernel backend; 'interpret' (with --platform) smoke-tests on CPU")
  parser.add_argument("--platform", choices=("gpu", "tpu"), help="default: the jax backend")
  parser.add_argument("--markdown", help="append the results as a markdown table to this file")
  opts = parser.parse_args()

  backend = jax.default_backend()
  platform = opts.platform or ("gpu" if backend in ("gpu", "cuda", "rocm") else backend)
  if platform not in ("gpu", "tpu"):
    raise SystemExit(f"bench/matmul.py needs a GPU or TPU (jax backend is {backend!r})")
  shapes = [tuple(map(int, s.split(","))) for s in opts.shapes] if opts.shapes else SHAPES
  device = jax.devices()[0].device_kind
  print(f"# device: {device}   jax {jax.__version__}   peak {opts.peak:g} TFLOP/s   TFLOP/s; "
        f"ours = {'fp8_matmul' if platform == 'gpu' else 'fp8_weight_matmul'} "
        f"(backend={opts.backend})")
  print(header())
  rows = []
  for k, n in shapes:
    for m in opts.m or (M_QUICK if opts.quick else M_ALL):
      rows.append(run_case(m, k, n, platform, opts))
      print(format_row(rows[-1]), flush=True)
  if opts.markdown:
    append_markdown(opts.markdown, f"bench/matmul.py on {device}, jax {jax.__version__}", rows)


if __name__ == "__main__":
  main()
