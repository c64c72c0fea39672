"""Work list for grouped matmul kernels: which (row tile, group) pairs to compute, in what order.

Rows [0, T) are sorted by group; group g owns rows [start_g, end_g). Rows past sum(group_sizes)
belong to a virtual group G whose output is zero. A work item is one (row tile, group) pair whose
row ranges intersect; items are ordered by group, then by tile, so the tile index never decreases
(a TPU output block is revisited only on consecutive grid steps) and a tile straddling a group
boundary appears once per group, each item writing only its own rows [lo, hi). Every row of
[0, T) is written by exactly one item. Empty groups get no item.

With n_tiles = ceil(T / block_m), there are at most n_tiles + G items (G + 1 groups counting the
virtual one), so arrays have that static length; entries past `num_items` repeat the last real
item with an empty row range.

`group_tile_schedule` (the weight-gradient kernel's list) has no virtual group (rows past the sum
contribute nothing) and gives every empty group one item with an empty row range (its output is
written as zeros); also at most n_tiles + G items.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Schedule", "row_tile_schedule", "group_tile_schedule", "group_bounds",
           "estimate_items"]


class Schedule(NamedTuple):
  """int32 arrays of static length max_items (see the module docstring) and the live count."""

  tile: jax.Array       # row tile of each item
  group: jax.Array      # group of each item; G marks the virtual all-zero group
  lo: jax.Array         # first row the item writes
  hi: jax.Array         # one past the last row the item writes (lo == hi: writes nothing)
  num_items: jax.Array  # int32 scalar, items actually used


def group_bounds(group_sizes: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """(starts, ends) int32 [G] of each group's rows, clipped to num_rows."""
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), num_rows)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  return starts, ends


def _enumerate(first: jax.Array, counts: jax.Array, max_items: int):
  """Items of groups with counts[g] consecutive row tiles from tile first[g], in group order:
  (item, tile, group, num_items), int32 [max_items] (the unused items past num_items repeat
  the last used one, so a kernel's index maps re-read nothing)."""
  item = jnp.arange(max_items, dtype=jnp.int32)
  group = jnp.repeat(jnp.arange(counts.shape[0], dtype=jnp.int32), counts,
                     total_repeat_length=max_items)
  tile = first[group] + item - (jnp.cumsum(counts) - counts)[group]
  num_items = jnp.sum(counts).astype(jnp.int32)
  valid, last_item = item < num_items, num_items - 1
  return (item, jnp.where(valid, tile, tile[last_item]), jnp.where(valid, group, group[last_item]),
          num_items)


def row_tile_schedule(group_sizes: jax.Array, num_rows: int, block_m: int) -> Schedule:
  """Builds the work list for lhs rows [0, num_rows) tiled by block_m (see module docstring)."""
  num_groups = group_sizes.shape[0]
  starts, ends = group_bounds(group_sizes, num_rows)
  total = ends[-1]
  starts = jnp.concatenate([starts, total[None]])
  ends = jnp.concatenate([ends, jnp.full((1,), num_rows, jnp.int32)])
  first = starts // block_m
  last = (ends - 1) // block_m
  counts = jnp.where(ends > starts, last - first + 1, 0)
  item, tile, group, num_items = _enumerate(first, counts, -(-num_rows // block_m) + num_groups)
  valid = item < num_items
  lo = jnp.maximum(starts[group], tile * block_m)
  hi = jnp.where(valid, jnp.minimum(ends[group], tile * block_m + block_m), lo)
  return Schedule(tile.astype(jnp.int32), group, lo.astype(jnp.int32), hi.astype(jnp.int32),
                  num_items)


def group_tile_schedule(group_sizes: jax.Array, num_rows: int, block_m: int) -> Schedule:
  """The work list of a per-group reduction over rows (the transposed grouped matmul): the
  (row tile, group) items of `row_tile_schedule` for the real groups, in group order, plus one
  item with lo == hi for each empty group (at the previous item's tile, so a kernel re-reads
  nothing); no item for rows past sum(group_sizes). Every group has >= 1 consecutive items."""
  num_groups = group_sizes.shape[0]
  n_tiles = -(-num_rows // block_m)
  starts, ends = group_bounds(group_sizes, num_rows)
  nonempty = ends > starts
  first = jnp.where(nonempty, starts // block_m,
                    jnp.minimum(jnp.maximum(starts - 1, 0) // block_m, n_tiles - 1))
  counts = jnp.where(nonempty, (ends - 1) // block_m - starts // block_m + 1, 1)
  item, tile, group, num_items = _enumerate(first, counts, n_tiles + num_groups)
  valid = item < num_items
  lo = jnp.where(nonempty[group], jnp.maximum(starts[group], tile * block_m), starts[group])
  hi = jnp.where(valid & nonempty[group], jnp.minimum(ends[group], tile * block_m + block_m), lo)
  return Schedule(tile.astype(jnp.int32), group, lo.astype(jnp.int32), hi.astype(jnp.int32),
                  num_items)


def estimate_items(rows: int, num_groups: int, bm: int) -> float:
  """Expected work items (row tile, group) with rows for `rows` live rows routed uniformly at
  random over `num_groups` groups, each item computing a whole bm-row tile: the static stand-in
  for the runtime count (`row_tile_schedule`) that a `pl.CostEstimate` needs.

  Closed form: the expected non-empty groups, G (1 - (1 - 1/G)^rows), plus one item per tile
  boundary inside [0, rows), ceil(rows / bm) - 1 (each splits the group that straddles it; a
  group starting exactly on a boundary, which saves one, is rare with random sizes). Items that
  compute nothing (the virtual group's, empty groups') are not counted.
  """
  if rows <= 0:
    return 0.0
  nonempty = num_groups * (1.0 - (1.0 - 1.0 / num_groups) ** rows)
  return nonempty + (-(-rows // bm) - 1)
