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
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Schedule", "row_tile_schedule", "group_bounds"]


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
  max_items = -(-num_rows // block_m) + num_groups
  item = jnp.arange(max_items, dtype=jnp.int32)
  group = jnp.repeat(jnp.arange(num_groups + 1, dtype=jnp.int32), counts,
                     total_repeat_length=max_items)
  offsets = jnp.cumsum(counts) - counts
  tile = first[group] + item - offsets[group]
  num_items = jnp.sum(counts).astype(jnp.int32)
  valid = item < num_items
  last_item = num_items - 1
  tile = jnp.where(valid, tile, tile[last_item])
  group = jnp.where(valid, group, group[last_item])
  lo = jnp.maximum(starts[group], tile * block_m)
  hi = jnp.where(valid, jnp.minimum(ends[group], tile * block_m + block_m), lo)
  return Schedule(tile.astype(jnp.int32), group, lo.astype(jnp.int32), hi.astype(jnp.int32),
                  num_items)
