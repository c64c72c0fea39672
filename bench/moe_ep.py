"""Expert-parallel MoE: bytes per all-to-all in the compiled program vs the ideal.

For each config (tiny, mid-size), builds the EP routed-expert layer (dsv3_jax.sharding) on an
expert mesh, compiles forward + backward, and prints every all-to-all of the compiled HLO with
its per-device buffer bytes next to the ideal tokens_per_device x top-k x hidden x dtype bytes.

    python bench/moe_ep.py            # 8 simulated CPU devices (sets XLA_FLAGS itself)
    python bench/moe_ep.py --markdown # the table for bench/RESULTS.md

With >= 8 accelerators the mesh uses them and the RAGGED exchange (ragged-all-to-all, whose
result buffer is the dropless bound but which moves only the routed rows); otherwise it uses 8
CPU devices and the PADDED exchange (fixed slots of n*min(K, E/S) rows per destination, which
is what moves). Only sizes are reported: nothing here is a timing.
"""
import argparse
import dataclasses
import datetime
import functools
import os
import sys

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dsv3_jax.moe import grouped_ffn  # noqa: E402
from dsv3_jax.sharding import Exchange, ep_layout, expert_parallel_ffn, make_mesh  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import hlo_collectives  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  tokens: int       # global tokens (batch x seq)
  hidden: int       # D
  ffn: int          # moe_intermediate_size F
  experts: int      # E
  top_k: int        # K
  dtype: str


CASES = [
    Case("tiny (dsv3_jax.TINY MoE)", 256, 64, 32, 8, 2, "float32"),
    Case("mid (D=2048, E=64, K=6)", 4096, 2048, 1024, 64, 6, "bfloat16"),
]


def measure(case: Case, shards: int = 8):
  acc = [d for d in jax.devices() if d.platform != "cpu"]
  devices = acc[:shards] if len(acc) >= shards else jax.devices("cpu")[:shards]
  exchange = Exchange.PADDED if devices[0].platform == "cpu" else Exchange.RAGGED
  mesh = make_mesh({"expert": shards}, devices=devices)
  dt = jnp.dtype(case.dtype)
  N, D, F, E, K = case.tokens, case.hidden, case.ffn, case.experts, case.top_k
  x = jax.ShapeDtypeStruct((N, D), dt)
  experts = jax.ShapeDtypeStruct((N, K), jnp.int32)
  weights = jax.ShapeDtypeStruct((N, K), jnp.float32)
  wg = jax.ShapeDtypeStruct((E, D, F), dt)
  wd = jax.ShapeDtypeStruct((E, F, D), dt)
  ffn = functools.partial(grouped_ffn, backend="reference")

  def loss(x, wg, wu, wd, experts, weights):
    y = expert_parallel_ffn(x, experts, weights, wg, wu, wd, ffn=ffn, layout=ep_layout(mesh),
                            exchange=exchange)
    return jnp.sum(y)

  with jax.set_mesh(mesh):
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(
        x, wg, wg, wd, experts, weights).compile().as_text()
  n = N // shards
  ideal = n * K * D * dt.itemsize
  rows = []
  for op, shapes, nbytes in hlo_collectives(hlo):
    kind = "expert ids" if shapes[0][0] in ("s32", "u32") else "token rows"
    ideal_here = n * K * 4 if kind == "expert ids" else ideal
    rows.append((op, kind, f"{len(shapes)} x {shapes[0][0]}{list(shapes[0][1])}", nbytes,
                 ideal_here))
  return devices[0].platform, exchange, n, rows


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--markdown", action="store_true", help="print a markdown table")
  args = ap.parse_args(argv)
  print(f"jax {jax.__version__}, {datetime.date.today()}, backend {jax.default_backend()}")
  for case in CASES:
    platform, exchange, n, rows = measure(case)
    head = (f"{case.name}: {case.tokens} tokens on EP=8 ({platform}, {exchange.value} exchange), "
            f"{n} tokens/device, K={case.top_k}, D={case.hidden}, {case.dtype}; forward+backward")
    if args.markdown:
      print(f"\n**{head}**\n")
      print("| all-to-all | payload | operand(s) per device | bytes/device | ideal bytes | ratio |")
      print("|---|---|---|---:|---:|---:|")
      for op, kind, shp, b, ideal in rows:
        print(f"| {op} | {kind} | {shp} | {b:,} | {ideal:,} | {b / ideal:.2f} |")
    else:
      print(head)
      for op, kind, shp, b, ideal in rows:
        print(f"  {op:18s} {kind:10s} {shp:28s} {b:>14,d} B  ideal {ideal:>12,d} B  "
              f"x{b / ideal:.2f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
