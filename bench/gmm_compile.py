"""TPU compile seconds (libtpu AOT on this CPU host) and cost-estimate flops of the bf16 grouped
matmul kernels used for training, ours (kernels_pallas/grouped_matmul/tpu_train.py) against jax's
megablox, at the DeepSeek-V3 expert-parallel shapes of one receive buffer: R rows (capacity 1.5 x
the average load n*K = 4096 x 8), K 7168, N 2048, 16 local experts.

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu python bench/gmm_compile.py [--topology T]

One line per (kernel, implementation): compile seconds of a jit holding that one call (the
schedule / padding ops around it included), and its cost estimate's flops over the flops of the
live rows (2 x n*K x K x N).
"""
import argparse
import importlib
import os
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from dsv3_jax.hlo_cost import hlo_cost  # noqa: E402
from dsv3_jax.kernels_pallas.grouped_matmul import tpu_train  # noqa: E402


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--topology", default="v5p:2x2x1")
  ap.add_argument("--rows", type=int, default=49152, help="receive buffer rows R")
  ap.add_argument("--live", type=int, default=32768, help="average live rows n*K")
  args = ap.parse_args(argv)
  mb = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")
  device = topologies.get_topology_desc(topology_name=args.topology, platform="tpu").devices[0]
  sd = lambda s, d=jnp.bfloat16: jax.ShapeDtypeStruct(  # noqa: E731
      s, d, sharding=jax.sharding.SingleDeviceSharding(device))
  t, k, n, g = args.rows, 7168, 2048, 16
  x, w, dy, gs = sd((t, k)), sd((g, k, n)), sd((t, n)), sd((g,), jnp.int32)
  tiles, live = (512, 512, 512), args.live
  cases = {
      ("gmm", "ours"): (lambda x, w, s: tpu_train.gmm(x, w, s, rows=live), (x, w, gs)),
      ("gmm", "megablox"): (lambda x, w, s: mb.gmm(x, w, s, tiling=tiles), (x, w, gs)),
      ("gmm rhs^T", "ours"): (lambda y, w, s: tpu_train.gmm(y, w, s, transpose_rhs=True,
                                                            rows=live), (dy, w, gs)),
      ("gmm rhs^T", "megablox"): (lambda y, w, s: mb.gmm(y, w, s, tiling=tiles,
                                                         transpose_rhs=True), (dy, w, gs)),
      ("tgmm", "ours"): (lambda x, y, s: tpu_train.tgmm(x, y, s, rows=live), (x, dy, gs)),
      ("tgmm", "megablox"): (lambda x, y, s: mb.tgmm(x.T, y, s, tiling=tiles), (x, dy, gs)),
  }
  for (kernel, impl), (f, a) in cases.items():
    start = time.perf_counter()
    with jax.default_matmul_precision("default"):  # megablox's dots take the ambient precision
      hlo = jax.jit(f).lower(*a).compile().as_text()
    seconds = time.perf_counter() - start
    flops = hlo_cost(hlo).flops  # the kernel's cost estimate (+ the small ops around it)
    print(f"{args.topology} {kernel:10s} {impl:9s} compile {seconds:6.1f} s  "
          f"estimate / live-row flops {flops / (2 * live * k * n):.3f}", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
