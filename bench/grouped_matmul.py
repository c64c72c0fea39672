"""Grouped (MoE expert) matmul against jax.lax.ragged_dot and the dense-equivalent bf16 matmul.

DeepSeek-V3 expert shapes: hidden 7168, moe_intermediate 2048, so the two products per expert
are up/gate [T, 7168] x [E, 7168, 2048] and down [T, 2048] x [E, 2048, 7168], for E local
experts (8 to 64) and T rows (tokens x top-k routed to this shard), with group sizes either
uniform (T/E each) or skewed (Zipf, exponent 1.2: a few hot experts, some nearly idle). One row
per case with TFLOP/s (2*T*K*N / time) of:

  ours      `grouped_matmul` (bf16), backend=pallas (GPU: auto flavour, Mosaic GPU on Hopper)
  triton, mosaic  GPU only: `grouped_matmul` forced to gpu_impl="triton" / "mosaic"
  ragged    XLA `jax.lax.ragged_dot` (bf16)
  dense     XLA bf16 [T, K] x [K, N], the same FLOPs without groups (the ceiling to approach)
  fp8w      `grouped_matmul_fp8`, e4m3 expert weights with 128x128 block scales, bf16 rows
  fp8       GPU only: `grouped_matmul_fp8` with e4m3 rows too (1x128 scales, quantised before)

then ours/ragged and ours/dense (goals: >= 5x and >= 0.6), and err = max |ours - ragged| /
max |ragged|. With --grad also fwd+bwd TFLOP/s (3 x the forward FLOPs) of ours and ragged.
Each timing: --warmup calls, then --iters calls back to back and one block_until_ready; the mean
per call of the best of --repeats (bench/common.py `time_call`). "ours % peak" is against 790
TFLOP/s (dense bf16 measured on the H100).

  python bench/grouped_matmul.py [--quick] [--experts 8 64] [--tokens 32768] [--grad]
      [--markdown bench/RESULTS.md]
  python bench/grouped_matmul.py --smoke   (CPU: 3 experts, 64 skewed rows, 256/128 dims, --grad, the
      GPU kernels in interpret mode, plus CUDA lowering of the kernels at the real shapes)
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

from dsv3_jax.kernels_pallas import (grouped_matmul, grouped_matmul_fp8,  # noqa: E402
                                     quantize_activations)

__all__ = ["group_sizes", "run_case", "main"]

EXPERTS_ALL = (8, 16, 32, 64)
EXPERTS_QUICK = (32,)
DISTRIBUTIONS = ("uniform", "skewed")
COLUMNS = (("E", "E", "d"), ("dist", "dist", "s"), ("T", "T", "d"), ("K", "K", "d"),
           ("N", "N", "d"), ("max_g", "max group", "d"), ("ours", "ours", ".1f"),
           ("triton", "triton", ".1f"), ("mosaic", "mosaic", ".1f"),
           ("ragged", "ragged", ".1f"), ("dense", "dense", ".1f"), ("fp8w", "fp8w", ".1f"),
           ("fp8", "fp8", ".1f"), ("vs_ragged", "ours/ragged", "s"),
           ("vs_dense", "ours/dense", "s"), ("peak", "ours % peak", "s"), ("err", "err", ".1e"))
GRAD_COLUMNS = (("ours_fb", "ours fwd+bwd", ".1f"), ("triton_fb", "triton fwd+bwd", ".1f"),
                ("mosaic_fb", "mosaic fwd+bwd", ".1f"), ("ragged_fb", "ragged fwd+bwd", ".1f"),
                ("vs_ragged_fb", "ours/ragged fwd+bwd", "s"))


def group_sizes(tokens: int, experts: int, distribution: str, seed: int = 0) -> np.ndarray:
  """int32 [experts] summing to tokens: uniform, or Zipf(1.2) weights in a shuffled order."""
  if distribution == "uniform":
    weights = np.ones(experts)
  else:
    weights = 1.0 / np.arange(1, experts + 1) ** 1.2
    np.random.RandomState(seed).shuffle(weights)
  sizes = np.floor(weights / weights.sum() * tokens).astype(np.int64)
  sizes[np.argmax(weights)] += tokens - sizes.sum()
  return sizes.astype(np.int32)


def _fwd_bwd(f, cot):
  def loss(x, w, g):
    return jnp.sum((f(x, w, g) * cot).astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def run_case(tokens, experts, k, n, distribution, platform, opts) -> dict:
  """One table row: TFLOP/s of every column, ratios, % of peak and err."""
  kx, kw, k8, ks = jax.random.split(jax.random.PRNGKey(experts * 7 + k), 4)
  x = jax.random.normal(kx, (tokens, k), jnp.float32).astype(jnp.bfloat16)
  w = (jax.random.normal(kw, (experts, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
  w8 = jnp.clip(jax.random.normal(k8, (experts, n, k), jnp.float32) * 100, -448, 448)
  w8 = w8.astype(jnp.float8_e4m3fn)
  w8_scale = jax.random.uniform(ks, (experts, -(-n // 128), -(-k // 128)), jnp.float32,
                                0.5, 2.0) / (100 * np.sqrt(k))
  sizes = group_sizes(tokens, experts, distribution)
  gs = jnp.asarray(sizes)
  timing = dict(warmup=opts.warmup, iters=opts.iters, repeats=opts.repeats)
  kw_ = dict(backend=opts.backend, platform=platform)
  flops = 2.0 * tokens * k * n
  tflops = lambda f, *args, mult=1: mult * flops / time_call(f, args, **timing) / 1e12

  ours = jax.jit(lambda x, w, g: grouped_matmul(x, w, g, **kw_))
  ragged = jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g))
  dense = jax.jit(lambda x, w: x @ w)
  fp8w = jax.jit(lambda x, w, s, g: grouped_matmul_fp8(x, w, s, g, **kw_))
  row = {"E": experts, "dist": distribution, "T": tokens, "K": k, "N": n,
         "max_g": int(sizes.max())}
  row["ours"] = tflops(ours, x, w, gs)
  flavours = {}
  for impl in ("triton", "mosaic"):
    flavours[impl] = jax.jit(lambda x, w, g, impl=impl: grouped_matmul(x, w, g, gpu_impl=impl,
                                                                         **kw_))
    row[impl] = tflops(flavours[impl], x, w, gs) if platform == "gpu" else None
  row["ragged"] = tflops(ragged, x, w, gs)
  row["dense"] = tflops(dense, x, w[0])
  row["fp8w"] = tflops(fp8w, x, w8, w8_scale, gs)
  if platform == "gpu":
    xq, xs = jax.jit(lambda x: quantize_activations(x, **kw_))(x)
    fp8 = jax.jit(lambda x, xs, w, s, g: grouped_matmul_fp8(x, w, s, g, lhs_scale=xs, **kw_))
    row["fp8"] = tflops(fp8, xq, xs, w8, w8_scale, gs)
  else:
    row["fp8"] = None
  ref = np.asarray(ragged(x, w, gs), np.float32)
  got = np.asarray(ours(x, w, gs), np.float32)
  row["err"] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
  row["vs_ragged"] = ratio(row["ours"], row["ragged"])
  row["vs_dense"] = ratio(row["ours"], row["dense"])
  row["peak"] = peak_fraction(row["ours"], H100_BF16_TFLOPS)
  if opts.grad:
    cot = jax.random.normal(kx, (tokens, n), jnp.float32).astype(jnp.bfloat16)
    row["ours_fb"] = tflops(_fwd_bwd(ours, cot), x, w, gs, mult=3)
    for impl, f in flavours.items():
      row[f"{impl}_fb"] = (tflops(_fwd_bwd(f, cot), x, w, gs, mult=3) if platform == "gpu"
                           else None)
    row["ragged_fb"] = tflops(_fwd_bwd(ragged, cot), x, w, gs, mult=3)
    row["vs_ragged_fb"] = ratio(row["ours_fb"], row["ragged_fb"])
  return row


def lowering_checks(tokens: int, experts: int, hidden: int, inter: int) -> None:
  """Lowers the GPU kernels (bf16 forward + backward, both FP8 variants) for CUDA at the real
  shapes."""
  sds = jax.ShapeDtypeStruct
  kw = dict(backend="pallas", platform="gpu")
  for k, n in ((hidden, inter), (inter, hidden)):
    x, gs = sds((tokens, k), jnp.bfloat16), sds((experts,), jnp.int32)
    w, cot = sds((experts, k, n), jnp.bfloat16), sds((tokens, n), jnp.bfloat16)
    w8 = sds((experts, n, k), jnp.float8_e4m3fn)
    w8_s = sds((experts, -(-n // 128), -(-k // 128)), jnp.float32)
    x8, x8_s = sds((tokens, k), jnp.float8_e4m3fn), sds((tokens, -(-k // 128)), jnp.float32)
    what = f"T {tokens} E {experts} K {k} N {n}"
    ours = lambda x, w, g: grouped_matmul(x, w, g, **kw)
    check_cuda_lowering(f"grouped_matmul {what}", ours, x, w, gs)
    check_cuda_lowering(f"grouped_matmul fwd+bwd {what}",
                        lambda x, w, g, c: jax.grad(lambda x, w: jnp.sum(
                            (ours(x, w, g) * c).astype(jnp.float32)), argnums=(0, 1))(x, w),
                        x, w, gs, cot)
    mosaic = lambda x, w, g: grouped_matmul(x, w, g, gpu_impl="mosaic", **kw)
    check_cuda_lowering(f"grouped_matmul mosaic fwd+bwd {what}",
                        lambda x, w, g, c: jax.grad(lambda x, w: jnp.sum(
                            (mosaic(x, w, g) * c).astype(jnp.float32)), argnums=(0, 1))(x, w),
                        x, w, gs, cot, marker="mosaic_gpu")
    check_cuda_lowering(f"grouped_matmul_fp8 (bf16 rows) {what}",
                        lambda x, w, s, g: grouped_matmul_fp8(x, w, s, g, **kw), x, w8, w8_s, gs)
    check_cuda_lowering(f"grouped_matmul_fp8 (e4m3 rows) {what}",
                        lambda x, xs, w, s, g: grouped_matmul_fp8(x, w, s, g, lhs_scale=xs, **kw),
                        x8, x8_s, w8, w8_s, gs)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="32 experts only")
  parser.add_argument("--experts", type=int, nargs="*", help="override the list of E")
  parser.add_argument("--tokens", type=int, default=32768, help="rows T (default 32768)")
  parser.add_argument("--hidden", type=int, default=7168)
  parser.add_argument("--inter", type=int, default=2048, help="moe_intermediate_size")
  parser.add_argument("--grad", action="store_true", help="also time forward + backward")
  parser.add_argument("--platform", choices=("gpu", "tpu"), help="default: the jax backend")
  add_timing_args(parser, warmup=3, iters=10, repeats=3)
  opts = parser.parse_args(argv)

  experts = opts.experts or (EXPERTS_QUICK if opts.quick else EXPERTS_ALL)
  if opts.smoke:
    lowering_checks(opts.tokens, max(experts), opts.hidden, opts.inter)
    experts, opts.tokens, opts.hidden, opts.inter, opts.grad = [3], 64, 256, 128, True
    opts.warmup, opts.iters, opts.repeats = 0, 1, 1
  platform = resolve_platform(opts, "bench/grouped_matmul.py")
  print_header(f"grouped matmul, bf16 (fp8 columns: e4m3 weights), TFLOP/s, T={opts.tokens}; "
               f"ours = grouped_matmul (backend={opts.backend})", opts)
  table = Table(COLUMNS + (GRAD_COLUMNS if opts.grad else ()))
  for e in experts:
    for distribution in (("skewed",) if opts.smoke else DISTRIBUTIONS):
      for k, n in ((opts.hidden, opts.inter), (opts.inter, opts.hidden)):
        table.add(run_case(opts.tokens, e, k, n, distribution, platform, opts))
  save_table(opts.markdown, f"Grouped matmul (bench/grouped_matmul.py), T={opts.tokens}", table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
