"""Our bf16/f32 grouped matmul kernels for TPU (Mosaic): gmm (forward, input gradient, and the
serving stack read at a layer index) and tgmm (the expert-weight gradient).

Letters: T rows (sorted by group), G groups, K contraction, N output, L stacked layers.
  gmm:  lhs [T, K] . rhs[g] -> [T, N]; rhs [G, K, N] ([G, N, K] with transpose_rhs), or the
        stack [L, G, K, N] / [L, G, N, K] read at a scalar-prefetched `layer`.
  tgmm: out[g] = lhs_g^T . dout_g: lhs [T, K], dout [T, N] -> [G, K, N]; empty groups -> 0.

Both run over a work list of (row tile, group) items scalar-prefetched into SMEM (`schedule`),
with the item count a runtime grid bound: only row tiles that hold rows of some group are
multiplied, each once per group it meets (a tile straddling a boundary is multiplied once per
group, masked to the group's rows). A capacity-sized expert-parallel receive buffer (1.5x the
average load) thus costs the rows actually received, not the buffer.

gmm: grid (N tiles, items, K tiles); each item accumulates its product in a float32 VMEM scratch
over the K steps and at the last one writes only its rows [lo, hi) of the output block (items of
one tile are consecutive, so the block stays in VMEM until all its rows are written). Items of
the virtual group (rows past sum(group_sizes)) skip the matmul, keep their block indices fixed
across K (no DMA) and write zeros. Weight tiles of another dtype are cast in VMEM.

tgmm: grid (K tiles, N tiles, items); items are ordered by group, so one group's items are
consecutive grid steps that keep the group's [bk, bn] output block resident: the first item zeroes
it, each item adds lhs_tile^T . dout_tile (rows outside [lo, hi) masked to zero), and a float32
output is the accumulator itself (no scratch, no extra buffer; other dtypes accumulate in a
float32 scratch and are cast at the group's last item). Empty groups get one item that writes
zeros (no matmul; its tile repeats the previous item's, so no DMA). Rows past the sum are never
read.

Cost estimates (`pl.CostEstimate`, what XLA and `dsv3_jax.hlo_cost` count for the call): the
kernels compute one whole bm-row tile per (row tile, group) item with rows. For `rows` live rows
(default T; under expert parallelism the average load of a receive buffer, see `grouped_matmul`)
routed uniformly over the G groups, the expected items are `schedule.estimate_items(rows, G, bm)`
= G (1 - (1 - 1/G)^rows) + ceil(rows / bm) - 1, so flops = 2 x items x bm x K x N (the tile
granularity included: ~1.12x the live rows at rows = 32768, G = 16, bm = 256); bytes: the lhs
(and dout) tiles once per output tile column they feed, each item's weight tile, the output once.

The live rows under expert parallelism (`moe.Experts` passes them): a receive buffer of shard j
holds the (token, expert) pairs routed to its El = E / S experts from all S token shards of its
expert group. Each of the S sources has n tokens x K pairs; with uniform routing a pair lands on
j's experts with probability El / E = 1 / S, so the expected rows are S x n K / S = n K (32768 at
n = 4096, K = 8), whatever the capacity R = capacity_factor x n K (49152 at 1.5) of the buffer.
Overflow rounds (load past R) run only when a shard is overloaded and are not counted.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsv3_jax.kernels_pallas.cost import mxu_dot
from dsv3_jax.kernels_pallas.fp8 import tpu as fp8_tpu
from dsv3_jax.kernels_pallas.grouped_matmul.schedule import (estimate_items, group_tile_schedule,
                                                             row_tile_schedule)

__all__ = ["gmm", "tgmm", "GMM_TILES", "TGMM_TILES"]

GMM_TILES = (256, 512, 1024)   # (bm, bk, bn): ~5 MiB of VMEM in bf16, double-buffered
TGMM_TILES = (256, 1024, 512)  # (bm, bk, bn): a 2 MiB float32 output block, double-buffered
_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _blocks(tiles, t: int, k: int, n: int) -> tuple[int, int, int]:
  """Checks the preferred (bm, bk, bn) tiles and returns the blocks used for a [t, k] x [k, n]
  product (`fp8_tpu.tile_size` of each dim)."""
  bm, bk, bn = tiles
  if bk % 128 or bn % 128 or bm % 8:
    raise ValueError(f"TPU tiles (bm, bk, bn) must be multiples of (8, 128, 128), got {tiles}")
  return tuple(fp8_tpu.tile_size(d, p) for d, p in zip((t, k, n), tiles))


def _gmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, layer_ref, x_ref, w_ref, *refs, num_groups, k,
                bk, nk, transpose_rhs, compute_dtype):
  del layer_ref  # used by the index maps only
  base_ref, o_ref, acc_ref = refs if len(refs) == 3 else (None, *refs)  # base: the `acc` input
  item, kk = pl.program_id(1), pl.program_id(2)
  lo, hi = lo_ref[item], hi_ref[item]

  @pl.when(kk == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when((group_ref[item] < num_groups) & (lo < hi))
  def _():
    x, w = x_ref[...].astype(compute_dtype), w_ref[...].astype(compute_dtype)
    if k % bk:  # the last K tile overhangs: both operands' padding may hold anything
      limit = k - kk * bk
      x = fp8_tpu.mask_columns(x, limit)
      kdim = 1 if transpose_rhs else 0
      idx = jax.lax.broadcasted_iota(jnp.int32, w.shape, kdim)
      w = jnp.where(idx < limit, w, jnp.zeros_like(w))
    acc_ref[...] += mxu_dot(x, w, _NT if transpose_rhs else _NN)

  @pl.when(kk == nk - 1)
  def _():
    rows = tile_ref[item] * acc_ref.shape[0] + jax.lax.broadcasted_iota(jnp.int32,
                                                                        acc_ref.shape, 0)
    mine = (rows >= lo) & (rows < hi)
    old = o_ref[...].astype(jnp.float32)  # select in f32: v5e has no bf16 VPU
    new = acc_ref[...]
    if base_ref is not None:
      new = new + base_ref[...].astype(jnp.float32)
    o_ref[...] = jnp.where(mine, new, old).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "tiles", "interpret",
                                             "rows"))
def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, layer: jax.Array | None = None,
        *, transpose_rhs: bool = False, out_dtype=None, tiles: tuple[int, int, int] | None = None,
        interpret: bool = False, rows: int | None = None, acc: jax.Array | None = None
        ) -> jax.Array:
  """lhs [T, K] . rhs[g] per group -> [T, N]; rows past sum(group_sizes) are zero.

  acc: None, or [T, N] of out_dtype: the result is acc + the product (rows past the groups keep
  acc), written in place of acc (input_output_aliases: donate it, or XLA copies it first); the
  sum is taken in float32 and rounded once.

  rhs: [G, K, N] ([G, N, K] with transpose_rhs, read transposed in VMEM), or with `layer` (int32
  scalar, may be traced; clipped to [0, L)) the stack [L, G, K, N] / [L, G, N, K] read in place
  at that layer. lhs bf16/f32; rhs any float dtype (tiles cast in VMEM to lhs.dtype).
  group_sizes int32 [G] (sum <= T; a larger sum is clipped). tiles = (bm, bk, bn), multiples of
  (8, 128, 128), cut to whole dims when larger (default GMM_TILES). rows: live rows the cost
  estimate assumes (default T; see the module docstring); never changes results.
  """
  t, k = lhs.shape
  stacked = layer is not None
  # rhs stays 3-D without a layer: an rhs[None] view made XLA:TPU write a second copy of the
  # weights (a multi-output fusion of the cast with its [1, G, K, N] form, 0.44 GiB per 671B
  # expert projection).
  rhs4 = rhs if stacked else jax.ShapeDtypeStruct((1, *rhs.shape), rhs.dtype)
  if not stacked:
    layer = 0
  num_layers, num_groups = rhs4.shape[:2]
  n, rhs_k = (rhs4.shape[2], rhs4.shape[3]) if transpose_rhs else (rhs4.shape[3], rhs4.shape[2])
  if rhs4.ndim != 4 or rhs_k != k or group_sizes.shape != (num_groups,):
    want = "[G, N, K]" if transpose_rhs else "[G, K, N]"
    raise ValueError(f"gmm: lhs {lhs.shape} needs rhs {want} (or [L, ...] with layer) with "
                     f"K = {k} and group_sizes [G]; got rhs {rhs4.shape[int(not stacked):]}, "
                     f"group_sizes {group_sizes.shape}")
  bm, bk, bn = _blocks(tiles or GMM_TILES, t, k, n)
  nk, nn = _cdiv(k, bk), _cdiv(n, bn)
  out_dtype = jnp.dtype(out_dtype or (lhs.dtype if acc is None else acc.dtype))
  if acc is not None and (acc.shape != (t, n) or acc.dtype != out_dtype):
    raise ValueError(f"gmm: acc must be [{t}, {n}] {out_dtype} (the output), got {acc.shape} "
                     f"{acc.dtype}")
  sched = row_tile_schedule(group_sizes, t, bm)
  layer = jnp.clip(jnp.asarray(layer, jnp.int32).reshape(1), 0, num_layers - 1)

  def k_of(it, kk, group_ref):  # virtual-group items hold K still: no DMA while they idle
    return jnp.where(group_ref[it] < num_groups, kk, 0)

  def x_map(j, it, kk, tile_ref, group_ref, lo_ref, hi_ref, layer_ref):
    return tile_ref[it], k_of(it, kk, group_ref)

  def w_map(j, it, kk, tile_ref, group_ref, lo_ref, hi_ref, layer_ref):
    g, kq = jnp.minimum(group_ref[it], num_groups - 1), k_of(it, kk, group_ref)
    idx = (g, j, kq) if transpose_rhs else (g, kq, j)
    return (layer_ref[0], *idx) if stacked else idx

  def o_map(j, it, kk, tile_ref, group_ref, lo_ref, hi_ref, layer_ref):
    return tile_ref[it], j

  items = estimate_items(t if rows is None else min(rows, t), num_groups, bm)
  cost = pl.CostEstimate(
      flops=round(2 * items * bm * k * n), transcendentals=0,
      bytes_accessed=round(nn * items * bm * k * lhs.dtype.itemsize  # x tiles, per N tile
                           + items * k * n * rhs.dtype.itemsize      # the items' weight tiles
                           + t * n * out_dtype.itemsize * (1 if acc is None else 2)))
  kernel = functools.partial(_gmm_kernel, num_groups=num_groups, k=k, bk=bk, nk=nk,
                             transpose_rhs=transpose_rhs, compute_dtype=lhs.dtype)
  w_block = ((None,) * (1 + stacked)) + ((bn, bk) if transpose_rhs else (bk, bn))
  # acc's block is the output's: read once per row tile (its items are consecutive), before the
  # tile is written back, so aliasing it to the output is safe.
  base = [] if acc is None else [pl.BlockSpec((bm, bn), o_map)]
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((t, n), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(nn, sched.num_items, nk),
          in_specs=[pl.BlockSpec((bm, bk), x_map), pl.BlockSpec(w_block, w_map)] + base,
          out_specs=pl.BlockSpec((bm, bn), o_map),
          scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      input_output_aliases={} if acc is None else {7: 0},
      interpret=interpret,
      name="dsv3_grouped_matmul_layer" if stacked else "dsv3_grouped_matmul",
      cost_estimate=cost,
  )(sched.tile, sched.group, sched.lo, sched.hi, layer, lhs, rhs, *([] if acc is None else [acc]))


def _tgmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, x_ref, dy_ref, *refs, bm, compute_dtype,
                 with_base):
  base_ref, o_ref, *scratch = refs if with_base else (None, *refs)  # base: the `acc` input
  acc_ref = scratch[0] if scratch else o_ref  # a float32 output is its own accumulator
  item, items = pl.program_id(2), pl.num_programs(2)
  group, lo, hi = group_ref[item], lo_ref[item], hi_ref[item]
  first = (item == 0) | (group_ref[jnp.maximum(item - 1, 0)] != group)
  last = (item == items - 1) | (group_ref[jnp.minimum(item + 1, items - 1)] != group)
  start = tile_ref[item] * bm

  @pl.when(first)
  def _():
    if base_ref is None:
      acc_ref[...] = jnp.zeros_like(acc_ref)
    else:
      acc_ref[...] = base_ref[...].astype(acc_ref.dtype)

  def accumulate(masked: bool):
    x, dy = x_ref[...].astype(compute_dtype), dy_ref[...].astype(compute_dtype)
    if masked:  # rows of other groups, or past T, may hold anything: zero both operands
      rx = start + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0)
      ry = start + jax.lax.broadcasted_iota(jnp.int32, dy.shape, 0)
      x = jnp.where((rx >= lo) & (rx < hi), x, jnp.zeros_like(x))
      dy = jnp.where((ry >= lo) & (ry < hi), dy, jnp.zeros_like(dy))
    acc_ref[...] += mxu_dot(x, dy, _TN)

  whole = (lo == start) & (hi == start + bm)
  pl.when(whole)(lambda: accumulate(False))
  pl.when(~whole & (lo < hi))(lambda: accumulate(True))

  if scratch:
    @pl.when(last)
    def _():
      o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype", "tiles", "interpret",
                                             "rows"))
def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, num_groups: int | None = None,
         out_dtype=None, tiles: tuple[int, int, int] | None = None, interpret: bool = False,
         rows: int | None = None, acc: jax.Array | None = None) -> jax.Array:
  """out[g] = lhs_g^T [K, T_g] . dout_g [T_g, N] -> [G, K, N] (empty groups: 0).

  acc: None, or [G, K, N] of out_dtype: the result is acc + the products (empty groups: acc),
  written in place of acc (input_output_aliases); each group's block starts from acc and
  accumulates in float32, rounded once.

  lhs [T, K] and dout [T, N] of one dtype (bf16/f32), group_sizes int32 [G] (sum <= T; a larger
  sum is clipped); num_groups must equal G when given. out_dtype defaults to lhs.dtype;
  accumulation is float32 (in the output block itself when out_dtype is float32). tiles =
  (bm, bk, bn) (default TGMM_TILES); rows: live rows the cost estimate assumes (default T).
  """
  t, k = lhs.shape
  n = dout.shape[1]
  g = group_sizes.shape[0]
  if dout.shape[0] != t:
    raise ValueError(f"tgmm: lhs {lhs.shape} and dout {dout.shape} must have the same rows")
  if num_groups is not None and num_groups != g:
    raise ValueError(f"tgmm: num_groups {num_groups} != len(group_sizes) {g}")
  bm, bk, bn = _blocks(tiles or TGMM_TILES, t, k, n)
  nk, nn = _cdiv(k, bk), _cdiv(n, bn)
  out_dtype = jnp.dtype(out_dtype or (lhs.dtype if acc is None else acc.dtype))
  if acc is not None and (acc.shape != (g, k, n) or acc.dtype != out_dtype):
    raise ValueError(f"tgmm: acc must be [{g}, {k}, {n}] {out_dtype} (the output), got "
                     f"{acc.shape} {acc.dtype}")
  sched = group_tile_schedule(group_sizes, t, bm)

  def x_map(kk, j, it, tile_ref, group_ref, lo_ref, hi_ref):
    return tile_ref[it], kk

  def dy_map(kk, j, it, tile_ref, group_ref, lo_ref, hi_ref):
    return tile_ref[it], j

  def o_map(kk, j, it, tile_ref, group_ref, lo_ref, hi_ref):
    return group_ref[it], kk, j

  items = estimate_items(t if rows is None else min(rows, t), g, bm)
  cost = pl.CostEstimate(
      flops=round(2 * items * bm * k * n), transcendentals=0,
      bytes_accessed=round(items * bm * (nn * k + nk * n) * lhs.dtype.itemsize
                           + g * k * n * out_dtype.itemsize * (1 if acc is None else 2)))
  f32_out = out_dtype == jnp.float32
  kernel = functools.partial(_tgmm_kernel, bm=bm, compute_dtype=lhs.dtype,
                             with_base=acc is not None)
  # acc's block is the output's: read at the group's first item, written back after its last.
  base = [] if acc is None else [pl.BlockSpec((None, bk, bn), o_map)]
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((g, k, n), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=4,
          grid=(nk, nn, sched.num_items),
          in_specs=[pl.BlockSpec((bm, bk), x_map), pl.BlockSpec((bm, bn), dy_map)] + base,
          out_specs=pl.BlockSpec((None, bk, bn), o_map),
          scratch_shapes=[] if f32_out else [pltpu.VMEM((bk, bn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      input_output_aliases={} if acc is None else {6: 0},
      interpret=interpret,
      name="dsv3_transposed_grouped_matmul",
      cost_estimate=cost,
  )(sched.tile, sched.group, sched.lo, sched.hi, lhs, dout, *([] if acc is None else [acc]))
