"""Apply a function to batch-sharded activations and a weight gathered whole on every device,
by explicit collectives, so that the weight's gradient leaves as a reduce-scatter into the
parameter's shards.

Left to GSPMD, a lookup or matmul against a vocab x hidden table sharded over the whole mesh
(embedding, LM head) with batch-sharded tokens is partitioned by computing full-size partial
gradients of the table on every device and all-reducing them (measured for the 671B train step
on 256 v5p chips: two bf16 [7168, 129280] and one f32 [129280, 7168] all-reduce, ~7 GiB live per
device). `with_whole_weight` runs the function inside a `shard_map`: the weight's local shard is
cast and all-gathered there, so the transpose is a `psum_scatter` and each device keeps only its
shard of the gradient; the activations stay split over the batch axes throughout.

This module imports nothing from the model.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

from dsv3_jax.sharding.rules import ShardingRules, current_rules, logical_to_spec

__all__ = ["with_whole_weight"]


def _parts(spec: P) -> list[tuple[str, ...]]:
  return [() if p is None else (p,) if isinstance(p, str) else tuple(p) for p in spec]


def with_whole_weight(fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                      w: jax.Array, w_axes: Sequence[str | None], dtype, *,
                      rules: ShardingRules | None = None, mesh=None) -> jax.Array:
  """fn(x, w) with `x` [batch, ...] split over the mesh's batch axes and `w` (a parameter with
  logical `w_axes`, e.g. ("vocab", "embed")) cast to `dtype` and gathered whole per shard.

  fn maps a batch slice of x to the same batch slice of its output (leading dim batch, e.g. a
  lookup or `x @ w`). Shardings come from `rules` (default `current_rules()`: the rules the caller
  placed the parameters with) on the ambient mesh (`jax.set_mesh`, or `mesh`). The cast happens on
  the local shard before the all-gather (the gather moves `dtype` bytes); the weight's gradient is
  reduce-scattered in `dtype` over its axes (and summed over the batch axes it is replicated on),
  then cast back. With no mesh, or no sharded weight dim, this is `fn(x, w)` without a cast (the
  caller casts, which keeps single-device numerics unchanged)."""
  m = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if m is None or m.empty:
    return fn(x, w)
  rules = rules or current_rules()
  manual = set(getattr(m, "manual_axes", ()) or ())
  w_spec = logical_to_spec(tuple(w_axes), rules, m, tuple(w.shape))
  x_spec = logical_to_spec(("batch",), rules, m, tuple(x.shape[:1]))
  w_parts, x_parts = _parts(w_spec), _parts(x_spec)
  used = {a for p in w_parts + x_parts for a in p}
  if not any(w_parts) or used & manual:
    return fn(x, w)

  def body(xl, wl):
    wl = wl.astype(dtype)
    for d, p in enumerate(w_parts):
      if p:
        wl = jax.lax.all_gather(wl, p if len(p) > 1 else p[0], axis=d, tiled=True)
    return fn(xl, wl)

  # check_vma=False: all_gather leaves its output typed as varying although it is replicated;
  # the transpose sums the weight's cotangent over the axes its spec does not mention.
  return jax.shard_map(body, mesh=m, in_specs=(x_spec, w_spec), out_specs=x_spec,
                       check_vma=False)(x, w)
