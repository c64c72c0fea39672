"""The expert-parallel routed-expert layer alone, forward + backward under remat, at DeepSeek-V3
shapes, compiled for a TPU topology on this CPU host (libtpu AOT): temporaries, compile seconds,
the large sorts left in the program, flops and bytes (`dsv3_jax.hlo_cost`, loops x trip count).

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 JAX_PLATFORMS=cpu python bench/ep_layer.py
    python bench/ep_layer.py --topology v5p:4x4x16 --mesh fsdp=16,expert=16 --capacity-factor 1.5

Per device: tokens = 4096 (batch 1 x 4096), K = 8, D = 7168, F = 2048, 256 experts, bf16 rows
and expert weights (as the model casts them), the Pallas grouped matmul, ragged all-to-all. The
weights enter split over `expert` only (what the layer sees after the FSDP gather). One JSON line.
The backward uses the grouped FFN's own VJP (`moe.grouped_ffn_vjp`, as `moe.Experts` does) unless
--autodiff-ffn. A structural A/B on a small topology (the same rows per receive buffer, D and F
smaller, --experts so that E / S matches the 671B run's 16 local experts; the
optimized HLO written for `bench/hlo_liveness.py`):

    python bench/ep_layer.py --topology v5p:2x2x2 --mesh expert=8 --experts 128 --hidden 1024 \
      --ffn 256 --hlo /tmp/ep.hlo
"""
import argparse
import functools
import json
import os
import re
import time

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from dsv3_jax.hlo_cost import hlo_cost  # noqa: E402
from dsv3_jax.moe import grouped_ffn  # noqa: E402
from dsv3_jax.sharding import expert_parallel_ffn, make_mesh  # noqa: E402


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--topology", default="v5p:4x4x16")
  ap.add_argument("--mesh", default="fsdp=16,expert=16")
  ap.add_argument("--tokens-per-device", type=int, default=4096)
  ap.add_argument("--capacity-factor", type=float, default=1.5)
  ap.add_argument("--experts", type=int, default=256)
  ap.add_argument("--hidden", type=int, default=7168, help="D")
  ap.add_argument("--ffn", type=int, default=2048, help="F")
  ap.add_argument("--autodiff-ffn", action="store_true",
                  help="jax's VJP of the grouped FFN in the backward (the code before ffn_vjp)")
  ap.add_argument("--hlo", help="write the compiled (optimized) HLO text here")
  args = ap.parse_args(argv)
  shape = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(","))}
  topo = topologies.get_topology_desc(topology_name=args.topology, platform="tpu")
  mesh = make_mesh(shape, devices=topo.devices)
  D, F, E, K = args.hidden, args.ffn, args.experts, 8
  N = args.tokens_per_device * len(topo.devices)
  tok = NamedSharding(mesh, P(tuple(shape)))
  ex = NamedSharding(mesh, P("expert"))
  sds = jax.ShapeDtypeStruct
  abstract = (sds((N, D), jnp.bfloat16, sharding=tok), sds((N, K), jnp.int32, sharding=tok),
              sds((N, K), jnp.float32, sharding=tok),
              sds((E, D, F), jnp.bfloat16, sharding=ex), sds((E, D, F), jnp.bfloat16, sharding=ex),
              sds((E, F, D), jnp.bfloat16, sharding=ex))
  # rows: a receive buffer's average live rows, n*K (what moe.Experts passes; cost estimates only)
  kw = dict(backend="pallas", platform="tpu", rows=args.tokens_per_device * K)
  ffn = functools.partial(grouped_ffn, **kw)
  if args.autodiff_ffn:
    ffn_vjp = None
  else:
    from dsv3_jax.moe import grouped_ffn_vjp
    ffn_vjp = functools.partial(grouped_ffn_vjp, **kw)

  @jax.checkpoint
  def layer(x, experts, weights, wg, wu, wd):
    extra = {} if ffn_vjp is None else {"ffn_vjp": ffn_vjp}
    return expert_parallel_ffn(x, experts, weights, wg, wu, wd, ffn=ffn,
                               capacity_factor=args.capacity_factor, **extra)

  def loss(*a):
    return jnp.sum(layer(*a) ** 2)

  with jax.set_mesh(mesh):
    t0 = time.time()
    lowered = jax.jit(jax.grad(loss, argnums=(0, 2, 3, 4, 5))).lower(*abstract)
    t1 = time.time()
    compiled = lowered.compile()
    t2 = time.time()
  m = compiled.memory_analysis()
  hlo = compiled.as_text()
  if args.hlo:
    with open(args.hlo, "w") as f:
      f.write(hlo)
  sorts = [int(n) for n in re.findall(r"= \(?\w+\[(\d+)\][^=]*? sort\(", hlo)]
  cost = hlo_cost(hlo)
  print(json.dumps(dict(
      topology=args.topology, mesh=shape, jax=jax.__version__, lower_s=round(t1 - t0, 1),
      compile_s=round(t2 - t1, 1), temp_gib=round(m.temp_size_in_bytes / 2**30, 3),
      argument_gib=round(m.argument_size_in_bytes / 2**30, 3),
      output_gib=round(m.output_size_in_bytes / 2**30, 3),
      peak_gib=round(getattr(m, "peak_memory_in_bytes", 0) / 2**30, 3),
      sorts_over_1k_rows=sum(n > 1024 for n in sorts), flops=cost.flops, bytes=cost.bytes)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
