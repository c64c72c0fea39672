"""Grouped (MoE expert) matmul against jax.lax.ragged_dot and the dense-equivalent bf16 matmul.

DeepSeek-V3 expert shapes: hidden 7168, moe_intermediate 2048, so the two products per expert
are up/gate [T, 7168] x [E, 7168, 2048] and down [T, 2048] x [E, 2048, 7168], for E local
experts (8 to 64) and T rows (tokens x top-k routed to this shard), with group sizes either
uniform (T/E each) or skewed (Zipf, exponent 1.2: a few hot experts, some nearly idle). One row
per case with TFLOP/s (2*T*K*N / time) of:

  ours      `grouped_matmul` (bf16), backend=pallas
  ragged    XLA `jax.lax.ragged_dot` (bf16)
  dense     XLA bf16 [T, K] x [K, N], the same FLOPs without groups (the ceiling to approach)
  fp8w      `grouped_matmul_fp8`, e4m3 expert weights with 128x128 block scales, bf16 rows
  fp8       GPU only: `grouped_matmul_fp8` with e4m3 rows too (1x128 scales, quantised before)

then ours/ragged and ours/dense (goals: >= 5x and >= 0.6), and err = max |ours - ragged| /
max |ragged|. With --grad also fwd+bwd TFLOP/s (3 x the forward FLOPs) of ours and ragged.
Each timing: --warmup calls, then --iters calls back to back and one block_until_ready; the mean
per call of the best of --repeats.

  python bench/grouped_matmul.py [--quick] [--experts 8 64] [--tokens 32768] [--grad]
      [--markdown bench/RESULTS.md]
  python bench/grouped_matmul.py --backend interpret --platform gpu --experts 3 --tokens 64 \
      --hidden 256 --inter 128 --iters 1 --repeats 1 --warmup 0   (CPU smoke run of the script)
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.kernels_pallas import grouped_matmul, grouped_matmul_fp8, quantize_activations

EXPERTS_ALL = (8, 16, 32, 64)
EXPERTS_QUICK = (32,)
DISTRIBUTIONS = ("uniform", "skewed")


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


def group_sizes(tokens: int, experts: int, distribution: str, seed: int = 0) -> np.ndarray:
  """int32 [experts] summing to tokens."""
  if distribution == "uniform":
    weights = np.ones(experts)
  else:
    weights = 1.0 / np.arange(1, experts + 1) ** 1.2
    np.random.RandomState(seed).shuffle(weights)
  sizes = np.floor(weights / weights.sum() * tokens).astype(np.int64)
  sizes[np.argmax(weights)] += tokens - sizes.sum()
  return sizes.astype(np.int32)


def run_case(tokens, experts, k, n, distribution, platform, opts) -> dict:
  kx, kw, k8, ks = jax.random.split(jax.random.PRNGKey(experts * 7 + k), 4)
  x = jax.random.normal(kx, (tokens, k), jnp.float32).astype(jnp.bfloat16)
  w = (jax.random.normal(kw, (experts, k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
  w8 = jnp.clip(jax.random.normal(k8, (experts, n, k), jnp.float32) * 100, -448, 448)
  w8 = w8.astype(jnp.float8_e4m3fn)
  w8_scale = jax.random.uniform(ks, (experts, -(-n // 128), -(-k // 128)), jnp.float32,
                                0.5, 2.0) / (100 * np.sqrt(k))
  sizes = group_sizes(tokens, experts, distribution)
  gs = jnp.asarray(sizes)
  w_dense = w[0]
  timing = dict(warmup=opts.warmup, iters=opts.iters, repeats=opts.repeats)
  kw_ = dict(backend=opts.backend, platform=platform)
  flops = 2.0 * tokens * k * n

  ours = jax.jit(lambda x, w, g: grouped_matmul(x, w, g, **kw_))
  ragged = jax.jit(lambda x, w, g: jax.lax.ragged_dot(x, w, g))
  dense = jax.jit(lambda x, w: x @ w)
  fp8w = jax.jit(lambda x, w, s, g: grouped_matmul_fp8(x, w, s, g, **kw_))
  row = {"E": experts, "dist": distribution, "T": tokens, "K": k, "N": n,
         "max_g": int(sizes.max())}
  row["ours"] = flops / time_call(ours, (x, w, gs), **timing) / 1e12
  row["ragged"] = flops / time_call(ragged, (x, w, gs), **timing) / 1e12
  row["dense"] = flops / time_call(dense, (x, w_dense), **timing) / 1e12
  row["fp8w"] = flops / time_call(fp8w, (x, w8, w8_scale, gs), **timing) / 1e12
  if platform == "gpu":
    xq, xs = jax.jit(lambda x: quantize_activations(x, **kw_))(x)
    fp8 = jax.jit(lambda x, xs, w, s, g: grouped_matmul_fp8(x, w, s, g, lhs_scale=xs, **kw_))
    row["fp8"] = flops / time_call(fp8, (xq, xs, w8, w8_scale, gs), **timing) / 1e12
  else:
    row["fp8"] = float("nan")
  ref = np.asarray(ragged(x, w, gs), np.float32)
  got = np.asarray(ours(x, w, gs), np.float32)
  row["err"] = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
  row["vs_ragged"] = row["ours"] / row["ragged"]
  row["vs_dense"] = row["ours"] / row["dense"]
  if opts.grad:
    cot = jax.random.normal(kx, (tokens, n), jnp.float32).astype(jnp.bfloat16)

    def fwd_bwd(f):
      def loss(x, w, g):
        return jnp.sum((f(x, w, g) * cot).astype(jnp.float32))
      return jax.jit(jax.grad(loss, argnums=(0, 1)))

    row["ours_fb"] = 3 * flops / time_call(fwd_bwd(ours), (x, w, gs), **timing) / 1e12
    row["ragged_fb"] = 3 * flops / time_call(fwd_bwd(ragged), (x, w, gs), **timing) / 1e12
  return row


COLUMNS = (("E", 4, "d"), ("dist", 8, "s"), ("T", 7, "d"), ("K", 6, "d"), ("N", 6, "d"),
           ("max_g", 7, "d"), ("ours", 8, ".1f"), ("ragged", 8, ".1f"), ("dense", 8, ".1f"),
           ("fp8w", 8, ".1f"), ("fp8", 8, ".1f"), ("vs_ragged", 10, ".2f"),
           ("vs_dense", 9, ".2f"), ("err", 8, ".1e"))
GRAD_COLUMNS = (("ours_fb", 8, ".1f"), ("ragged_fb", 10, ".1f"))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="32 experts only")
  parser.add_argument("--experts", type=int, nargs="*", help="override the list of E")
  parser.add_argument("--tokens", type=int, default=32768, help="rows T (default 32768)")
  parser.add_argument("--hidden", type=int, default=7168)
  parser.add_argument("--inter", type=int, default=2048, help="moe_intermediate_size")
  parser.add_argument("--grad", action="store_true", help="also time forward + backward")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--backend", default="pallas",
                      help="kernel backend; 'interpret' (with --platform) smoke-tests on CPU")
  parser.add_argument("--platform", choices=("gpu", "tpu"), help="default: the jax backend")
  parser.add_argument("--markdown", help="append the results as a markdown table to this file")
  opts = parser.parse_args()

  backend = jax.default_backend()
  platform = opts.platform or ("gpu" if backend in ("gpu", "cuda", "rocm") else backend)
  if platform not in ("gpu", "tpu"):
    raise SystemExit(f"bench/grouped_matmul.py needs a GPU or TPU (jax backend is {backend!r})")
  columns = COLUMNS + (GRAD_COLUMNS if opts.grad else ())
  device = jax.devices()[0].device_kind
  print(f"# device: {device}   jax {jax.__version__}   TFLOP/s   (backend={opts.backend})")
  print(" ".join(f"{name:>{width}}" for name, width, _ in columns))
  rows = []
  for experts in opts.experts or (EXPERTS_QUICK if opts.quick else EXPERTS_ALL):
    for distribution in DISTRIBUTIONS:
      for k, n in ((opts.hidden, opts.inter), (opts.inter, opts.hidden)):
        rows.append(run_case(opts.tokens, experts, k, n, distribution, platform, opts))
        print(" ".join(f"{rows[-1][name]:>{width}{spec}}" for name, width, spec in columns),
              flush=True)
  if opts.markdown:
    with open(opts.markdown, "a") as f:
      f.write(f"\n## bench/grouped_matmul.py on {device}, jax {jax.__version__}, "
              f"T={opts.tokens}\n\n| " + " | ".join(name for name, _, _ in columns) + " |\n")
      f.write("|" + "---|" * len(columns) + "\n")
      for row in rows:
        f.write("| " + " | ".join(f"{row[name]:{spec}}" for name, _, spec in columns) + " |\n")


if __name__ == "__main__":
  main()
