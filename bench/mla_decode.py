"""MLA decode bandwidth: our Pallas kernel vs the XLA reference, latent cache in bf16.

One absorbed query token per sequence, 128 heads, 576 cached values per row (the latent part
[.., rows, 512] and the transposed rope part [.., 64, rows]), every sequence filled to the
context length. The figure of merit is effective HBM bandwidth: cache
bytes read (batch * context * 576 * 2) divided by the time of one decode call, reported against
3.0 TB/s (the device-to-device copy rate measured on the H100, ARCHITECTURE.md). Split-K is
chosen by the kernel's default heuristic unless --splits is given. With --paged the cache is a
shuffled page pool (--page-size rows per page) addressed through block tables. err = max |ours -
ref| / max |ref| (a broken kernel shows before its speed is trusted). On a GPU the "triton" and
"mosaic" columns force `mla_decode(gpu_impl=...)` (Mosaic GPU falls back to Triton for shapes it
does not take); "ours" is the automatic choice (Mosaic GPU on Hopper). --tokens T times a
speculative verification step: T query tokens per sequence (q [batch, T, heads, 576], causal
among themselves) in one call; the bytes counted stay one cache read (Triton folds T into its
rows; Mosaic GPU runs one CTA per token and head block, the repeated reads hitting L2).

Timing (bench/common.py `time_call`): --warmup calls, then the best of --repeats batches of
--iters calls, one block_until_ready per batch. Prints a markdown table preceded by device and
jax version; --markdown PATH writes it as a section of PATH.

  python bench/mla_decode.py [--quick] [--batches 1 8 64] [--contexts 1024 8192] [--paged]
                             [--tokens 2]
  python bench/mla_decode.py --smoke   (CPU: 16 heads, short contexts, contiguous and paged,
                                        split-K 2, GPU kernel in interpret mode, plus CUDA
                                        lowering at the real shapes)
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (H100_HBM_TBS, Table, add_timing_args, attempt,  # noqa: E402
                    check_cuda_lowering, kernel_options, peak_fraction, print_header, ratio,
                    save_table, time_call)

from dsv3_jax.kernels_pallas.backend import gpu_flavor  # noqa: E402
from dsv3_jax.kernels_pallas.mla_decode import (mla_decode, mla_decode_reference,  # noqa: E402
                                                 split_cache)

__all__ = ["make_inputs", "main"]

RANK, ROPE = 512, 64
SCALE = (128 + ROPE) ** -0.5


def make_inputs(batch: int, ctx: int, heads: int, paged: bool, page_size: int, rng,
                tokens: int = 1):
  """q [batch, heads, 576] (tokens > 1: [batch, tokens, heads, 576]), the cache parts latent,
  rope (contiguous [batch, ctx, 512] and [batch, 64, ctx], or a shuffled page pool [pages,
  page_size, 512] and [pages, 64, page_size]), lengths int32 [batch] (= ctx, including the new
  tokens), block tables int32 or None."""
  kq, kc = jax.random.split(jax.random.key(batch * 100003 + ctx))
  q = jax.random.normal(kq, (batch,) + ((tokens,) if tokens > 1 else ()) + (heads, RANK + ROPE),
                        jnp.bfloat16)
  lengths = jnp.full((batch,), ctx, jnp.int32)
  if paged:
    if ctx % page_size:
      raise SystemExit(f"--paged needs contexts that are multiples of --page-size {page_size}; "
                       f"got {ctx}")
    pages = batch * (ctx // page_size)
    cache = jax.random.normal(kc, (pages, page_size, RANK + ROPE), jnp.bfloat16)
    tables = jnp.asarray(rng.permutation(pages).reshape(batch, -1), jnp.int32)
  else:
    cache = jax.random.normal(kc, (batch, ctx, RANK + ROPE), jnp.bfloat16)
    tables = None
  return (q, *split_cache(cache, RANK), lengths, tables)


def _block_sizes(splits: int | None, platform: str | None, gpu_impl: str | None = None):
  """The selected kernel's BlockSizes with num_splits, or None (the kernel's heuristic)."""
  if splits is None:
    return None
  platform = platform or ("gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "tpu")
  if platform == "gpu" and gpu_flavor(gpu_impl) == "mosaic":
    from dsv3_jax.kernels_pallas.mla_decode import mosaic_gpu
    return mosaic_gpu.BlockSizes(num_splits=splits)
  if platform == "gpu":
    from dsv3_jax.kernels_pallas.mla_decode import gpu as kernel
  else:
    from dsv3_jax.kernels_pallas.mla_decode import tpu as kernel
  return kernel.BlockSizes(num_splits=splits)


def lowering_checks(batch: int, ctx: int, heads: int, page_size: int, splits,
                    tokens: int = 1) -> None:
  """Lowers our kernel for CUDA at the real shapes, contiguous and paged, Triton and Mosaic GPU."""
  sds = jax.ShapeDtypeStruct
  bs = _block_sizes(splits, "gpu")
  q = sds((batch,) + ((tokens,) if tokens > 1 else ()) + (heads, RANK + ROPE), jnp.bfloat16)
  lengths = sds((batch,), jnp.int32)
  parts = lambda n, rows: (sds((n, rows, RANK), jnp.bfloat16),  # noqa: E731
                           sds((n, ROPE, rows), jnp.bfloat16))
  contiguous, pool = parts(batch, ctx), parts(batch * ctx // page_size, page_size)
  tables = sds((batch, ctx // page_size), jnp.int32)
  f = lambda q, c, r, n, t: mla_decode(q, c, r, n, scale=SCALE, block_tables=t,
                                       backend="pallas", platform="gpu", block_sizes=bs)
  check_cuda_lowering(f"mla_decode batch {batch} ctx {ctx}", f, q, *contiguous, lengths, None)
  check_cuda_lowering(f"mla_decode paged batch {batch} ctx {ctx}", f, q, *pool, lengths, tables)
  bs = _block_sizes(splits, "gpu", "mosaic")
  f = lambda q, c, r, n, t: mla_decode(q, c, r, n, scale=SCALE, block_tables=t,
                                       backend="pallas", platform="gpu", block_sizes=bs,
                                       gpu_impl="mosaic")
  check_cuda_lowering(f"mla_decode mosaic batch {batch} ctx {ctx}", f, q, *contiguous, lengths,
                      None, marker="mosaic_gpu")
  check_cuda_lowering(f"mla_decode mosaic paged batch {batch} ctx {ctx}", f, q, *pool, lengths,
                      tables, marker="mosaic_gpu")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="batch 1 and 64, context 4k and 32k")
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64, 128])
  ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192, 16384, 32768])
  ap.add_argument("--heads", type=int, default=128)
  ap.add_argument("--paged", action="store_true")
  ap.add_argument("--page-size", type=int, default=64)
  ap.add_argument("--splits", type=int, default=None, help="override the split-K factor")
  ap.add_argument("--tokens", type=int, default=1,
                  help="query tokens per sequence (speculative verification: 1 + drafts)")
  add_timing_args(ap, warmup=3, iters=20, repeats=3)
  a = ap.parse_args(argv)
  if a.quick:
    a.batches, a.contexts, a.iters, a.repeats = [1, 64], [4096, 32768], 5, 2
  layouts = [a.paged]
  if a.smoke:
    lowering_checks(a.batches[-1], a.contexts[-1], a.heads, a.page_size, a.splits, a.tokens)
    a.batches, a.contexts, a.heads, a.page_size = [1, 2], [128], 16, 32
    a.splits = a.splits or 2
    a.warmup, a.iters, a.repeats = 1, 1, 1
    layouts = [False, True]
  kw = kernel_options(a)
  block_sizes = _block_sizes(a.splits, kw["platform"])

  print_header(f"MLA decode, bf16 cache rows of {RANK}+{ROPE}, {a.heads} heads, page size "
               f"{a.page_size} where paged, split-K {a.splits or 'heuristic'}, {a.tokens} query "
               f"token(s) per sequence; GB/s of cache "
               f"read, % of {H100_HBM_TBS:.1f} TB/s", a)
  table = Table([("cache", "cache", "s"), ("batch", "batch", "d"), ("ctx", "context", "d"),
                 ("mb", "cache MB", ".0f"), ("ours", "ours GB/s", ".0f"),
                 ("triton", "triton GB/s", ".0f"), ("mosaic", "mosaic GB/s", ".0f"),
                 ("xla", "xla ref GB/s", ".0f"), ("vs_xla", "ours/xla", "s"),
                 ("peak", "ours % peak", "s"), ("err", "err", ".1e")])
  timing = dict(warmup=a.warmup, iters=a.iters, repeats=a.repeats)
  rng = np.random.default_rng(0)
  ours = jax.jit(lambda q, c, r, n, t: mla_decode(q, c, r, n, scale=SCALE, block_tables=t,
                                                  block_sizes=block_sizes, **kw))
  on_gpu = jax.default_backend() == "gpu" and not a.smoke
  flavours = {impl: jax.jit(lambda q, c, r, n, t, impl=impl: mla_decode(
      q, c, r, n, scale=SCALE, block_tables=t, gpu_impl=impl,
      block_sizes=_block_sizes(a.splits, "gpu", impl), **kw)) for impl in ("triton", "mosaic")}
  ref = jax.jit(lambda q, c, r, n, t: mla_decode_reference(q, c, r, n, scale=SCALE,
                                                           block_tables=t))
  for paged in layouts:
    for batch in a.batches:
      for ctx in a.contexts:
        args = make_inputs(batch, ctx, a.heads, paged, a.page_size, rng, a.tokens)
        nbytes = batch * ctx * (RANK + ROPE) * 2
        row = {"cache": "paged" if paged else "contiguous", "batch": batch, "ctx": ctx,
               "mb": nbytes / 1e6}
        for name, fn in (("ours", ours), ("xla", ref)) + tuple(flavours.items()):
          if name in flavours and not on_gpu:
            row[name] = None  # GPU only
            continue
          row[name] = attempt(lambda: nbytes / time_call(fn, args, **timing) / 1e9)

        def err():
          want = np.asarray(ref(*args), np.float32)
          got = np.asarray(ours(*args), np.float32)
          return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))

        row["err"] = attempt(err) if isinstance(row["ours"], float) else None
        row.update(vs_xla=ratio(row["ours"], row["xla"]),
                   peak=peak_fraction(row["ours"], H100_HBM_TBS * 1e3))
        table.add(row)
  save_table(a.markdown, "MLA decode (bench/mla_decode.py)", table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
