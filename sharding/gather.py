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
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv3_jax.sharding.rules import ShardingRules, current_rules, logical_to_spec

__all__ = ["with_whole_weight", "few_token_logits", "few_token_lookup"]


def _parts(spec: P) -> list[tuple[str, ...]]:
  return [() if p is None else (p,) if isinstance(p, str) else tuple(p) for p in spec]


def _specs(x, w, w_axes, rules, mesh):
  """(mesh, x_spec, w_spec, x_parts, w_parts (one tuple of mesh axes per dim of w)) for x
  [batch, ...] split on the rules' batch axes and w on its logical axes; None when there is no
  mesh, w is not sharded, or an axis involved is already manual (inside another shard_map)."""
  m = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if m is None or m.empty:
    return None
  rules = rules or current_rules()
  manual = set(getattr(m, "manual_axes", ()) or ())
  w_spec = logical_to_spec(tuple(w_axes), rules, m, tuple(w.shape))
  x_spec = logical_to_spec(("batch",), rules, m, tuple(x.shape[:1]))
  w_parts, x_parts = _parts(w_spec), _parts(x_spec)
  w_parts += [()] * (w.ndim - len(w_parts))
  if not any(w_parts) or {a for p in w_parts + x_parts for a in p} & manual:
    return None
  return m, x_spec, w_spec, x_parts, w_parts


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
  specs = _specs(x, w, w_axes, rules, mesh)
  if specs is None:
    return fn(x, w)
  m, x_spec, w_spec, _, w_parts = specs

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


def _axis_index(axes: tuple[str, ...]):
  """Linear index of this device over `axes` (major to minor, as a tiled all_gather orders)."""
  idx = 0
  for a in axes:
    idx = idx * jax.lax.axis_size(a) + jax.lax.axis_index(a)
  return idx


def _gather_plan(x, w, w_axes, vocab_dim: int, rules, mesh):
  """Specs for the few-token vocab ops: (mesh, x_spec, w_spec, gather axes G, rest of the batch
  axes, vocab axes, embed axes) or None when there is nothing sharded to avoid gathering."""
  specs = _specs(x, w, w_axes, rules, mesh)
  if specs is None:
    return None
  m, x_spec, w_spec, x_parts, w_parts = specs
  batch = x_parts[0] if x_parts else ()
  vocab = w_parts[vocab_dim]
  embed = w_parts[1 - vocab_dim]
  # Gather the batch axes from the first one w also uses on: the rest (the major axes) then
  # still splits the batch into contiguous blocks, which an out_spec can name.
  first = next((i for i, a in enumerate(batch) if a in vocab or a in embed), len(batch))
  rest, gather = batch[:first], batch[first:]
  return m, x_spec, w_spec, gather, rest, vocab, embed


def _spec(*parts: tuple[str, ...]) -> P:
  return P(*[None if not p else p[0] if len(p) == 1 else p for p in parts])


def few_token_logits(x: jax.Array, w: jax.Array, w_axes: Sequence[str | None], dtype, *,
                     rules: ShardingRules | None = None, mesh=None) -> jax.Array:
  """x [B, ..., D] @ w [D, V] (logical axes `w_axes`, e.g. ("embed", "vocab")) in `dtype`, for a
  step with few tokens (fewer than the vocabulary): the activations are all-gathered over the
  batch axes from the first one the weight is also split on (B x T x D values, tiny next to the
  weight), each device multiplies them by its local [D/e, V/v] shard of w, and the partial sums
  are psum-ed (in float32) over the axes w's hidden dim is split on. No weight-sized collective.
  Returns [B, ..., V] in `dtype`, split over vocab on w's vocab axes and over batch on the
  remaining (major) batch axes, replicated over the gathered ones. Without a mesh or a sharded
  w: `x @ w` in `dtype`."""
  plan = _gather_plan(x, w, w_axes, 1, rules, mesh)
  if plan is None:
    return jnp.einsum("...i,io->...o", x.astype(dtype), w.astype(dtype))
  m, x_spec, w_spec, gather, rest, vocab, embed = plan

  def body(xl, wl):
    xl = xl.astype(dtype)
    if gather:
      xl = jax.lax.all_gather(xl, gather, axis=0, tiled=True)
    if not embed:
      return jnp.einsum("...i,io->...o", xl, wl.astype(dtype))
    d = wl.shape[0]
    xl = jax.lax.dynamic_slice_in_dim(xl, _axis_index(embed) * d, d, axis=-1)
    # Partial sums over a slice of the hidden dim: added in float32, rounded once.
    y = jnp.einsum("...i,io->...o", xl, wl.astype(dtype), preferred_element_type=jnp.float32)
    return jax.lax.psum(y, embed).astype(dtype)

  out = _spec(rest, *[()] * (x.ndim - 2), vocab)
  # check_vma=False: the gathered/psum-ed values are replicated over the axes out_spec omits.
  return jax.shard_map(body, mesh=m, in_specs=(x_spec, w_spec), out_specs=out,
                       check_vma=False)(x, w)


def few_token_lookup(tokens: jax.Array, table: jax.Array, table_axes: Sequence[str | None],
                     dtype, *, rules: ShardingRules | None = None, mesh=None) -> jax.Array:
  """table[tokens] for tokens [B, T] int and table [V, D] (logical axes `table_axes`, e.g.
  ("vocab", "embed")) in `dtype`, for a step with few tokens: the token ids are all-gathered over
  the batch axes from the first one the table is also split on, each device looks up the ids
  that fall in its local vocab rows (zeros elsewhere), psum over the vocab axes, all-gather over
  the hidden-dim axes ([B, T, D] values, never table-sized). Returns [B, T, D] in `dtype`, split
  over batch on the remaining (major) batch axes (GSPMD re-slices the rest locally). Without a
  mesh or a sharded table: `jnp.take(table, tokens, axis=0)` (no cast)."""
  plan = _gather_plan(tokens, table, table_axes, 0, rules, mesh)
  if plan is None:
    return jnp.take(table, tokens, axis=0)
  m, x_spec, w_spec, gather, rest, vocab, embed = plan

  def body(tl, wl):
    if gather:
      tl = jax.lax.all_gather(tl, gather, axis=0, tiled=True)
    rows = wl.shape[0]
    local = tl - (_axis_index(vocab) * rows if vocab else 0)
    hit = (local >= 0) & (local < rows)
    y = jnp.take(wl, jnp.clip(local, 0, rows - 1), axis=0).astype(dtype)  # cast the rows only
    y = jnp.where(hit[..., None], y, jnp.zeros((), dtype))
    if vocab:
      y = jax.lax.psum(y, vocab)
    if embed:
      y = jax.lax.all_gather(y, embed, axis=y.ndim - 1, tiled=True)
    return y

  return jax.shard_map(body, mesh=m, in_specs=(x_spec, w_spec), out_specs=_spec(rest),
                       check_vma=False)(tokens, table)
