"""MLA decode bandwidth: our Pallas kernel vs the XLA reference, latent cache in bf16.

One absorbed query token per sequence, 128 heads, cache rows of 576 (512 latent + 64 rope), every
sequence filled to the context length. The figure of merit is effective HBM bandwidth: cache
bytes read (batch * context * 576 * 2) divided by the time of one decode call, reported against
3.0 TB/s (the device-to-device copy rate measured on the H100, ARCHITECTURE.md). Split-K is
chosen by the kernel's default heuristic unless --splits is given. With --paged the cache is a
shuffled page pool (--page-size rows per page) addressed through block tables.

Each function is jitted, run --warmup times, then timed over --iters calls (block_until_ready
after each timed batch of calls); the best of --repeats batches is reported. Prints a markdown
table (ready for bench/RESULTS.md) preceded by device and jax version.

  python bench/mla_decode.py [--quick] [--batches 1 8 64] [--contexts 1024 8192] [--paged]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.kernels_pallas.mla_decode import mla_decode, mla_decode_reference

PEAK_TBS = 3.0
HEADS, RANK, ROPE = 128, 512, 64


def bench(fn, args, *, warmup: int, iters: int, repeats: int) -> float:
  """Best seconds per call of a jitted fn."""
  out = None
  for _ in range(warmup):
    out = fn(*args)
  jax.block_until_ready(out)
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / iters)
  return best


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="batch 1 and 64, context 4k and 32k")
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128])
  ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
  ap.add_argument("--paged", action="store_true")
  ap.add_argument("--page-size", type=int, default=64)
  ap.add_argument("--splits", type=int, default=None, help="override the split-K factor")
  ap.add_argument("--backend", default="pallas")
  ap.add_argument("--warmup", type=int, default=3)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--repeats", type=int, default=3)
  a = ap.parse_args()
  if a.quick:
    a.batches, a.contexts, a.iters, a.repeats = [1, 64], [4096, 32768], 5, 2

  block_sizes = None
  if a.splits is not None:
    platform = "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu"
    if platform == "gpu":
      from dsv3_jax.kernels_pallas.mla_decode import gpu as kernel
    else:
      from dsv3_jax.kernels_pallas.mla_decode import tpu as kernel
    block_sizes = kernel.BlockSizes(num_splits=a.splits)

  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print(f"MLA decode, bf16 cache rows of {RANK}+{ROPE}, {HEADS} heads, "
        f"{'paged (page ' + str(a.page_size) + ')' if a.paged else 'contiguous'} cache; "
        f"GB/s of cache read, % of {PEAK_TBS:.1f} TB/s\n")
  print("| batch | context | cache MB | ours GB/s | xla ref GB/s | ours/xla | ours % peak |")
  print("|---|---|---|---|---|---|---|")
  scale = (128 + ROPE) ** -0.5
  timing = dict(warmup=a.warmup, iters=a.iters, repeats=a.repeats)
  rng = np.random.default_rng(0)
  for batch in a.batches:
    for ctx in a.contexts:
      kq, kc = jax.random.split(jax.random.key(batch * 100003 + ctx))
      q = jax.random.normal(kq, (batch, HEADS, RANK + ROPE), jnp.bfloat16)
      lengths = jnp.full((batch,), ctx, jnp.int32)
      if a.paged:
        pages = batch * (ctx // a.page_size)
        cache = jax.random.normal(kc, (pages, a.page_size, RANK + ROPE), jnp.bfloat16)
        tables = jnp.asarray(rng.permutation(pages).reshape(batch, -1), jnp.int32)
      else:
        cache = jax.random.normal(kc, (batch, ctx, RANK + ROPE), jnp.bfloat16)
        tables = None
      nbytes = batch * ctx * (RANK + ROPE) * 2
      ours = jax.jit(lambda q, c, n, t: mla_decode(q, c, n, scale=scale, kv_lora_rank=RANK,
                                                   block_tables=t, backend=a.backend,
                                                   block_sizes=block_sizes))
      ref = jax.jit(lambda q, c, n, t: mla_decode_reference(q, c, n, scale=scale,
                                                            kv_lora_rank=RANK, block_tables=t))
      gbs = {}
      for name, fn in (("ours", ours), ("xla", ref)):
        try:
          gbs[name] = nbytes / bench(fn, (q, cache, lengths, tables), **timing) / 1e9
        except Exception as e:  # noqa: BLE001 -- a failing case must not stop the table
          gbs[name] = f"err ({type(e).__name__})"
      fmt = lambda x: x if isinstance(x, str) else f"{x:.0f}"
      both = all(isinstance(x, float) for x in gbs.values())
      ratio = f"{gbs['ours'] / gbs['xla']:.2f}x" if both else "-"
      peak = (f"{100 * gbs['ours'] / (PEAK_TBS * 1e3):.1f}%" if isinstance(gbs["ours"], float)
              else "-")
      print(f"| {batch} | {ctx} | {nbytes / 1e6:.0f} | {fmt(gbs['ours'])} | {fmt(gbs['xla'])} | "
            f"{ratio} | {peak} |", flush=True)
      del cache, q


if __name__ == "__main__":
  main()
