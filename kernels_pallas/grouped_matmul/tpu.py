"""Grouped matmul kernels for TPUs (Mosaic).

bf16/f32: jax's megablox kernels (`gmm`, `tgmm` in jax.experimental.pallas.ops.tpu.megablox),
called rather than re-implemented. Megablox needs T to be a multiple of its row tile (lhs is
padded with zero rows here) and leaves rows past sum(group_sizes) unwritten (zeroed here).

Stacked weights at a layer index (inference, forward only): `gmm_layer` takes the whole scanned
stack [L, G, K, N] and a layer index scalar-prefetched into SMEM; the weight BlockSpec's index
map picks (layer, group, K tile, N tile), so only that layer's tiles of the groups that have rows
cross HBM and the stack is never sliced (XLA cannot fuse a dynamic-slice into a custom call, and
materialises it: a copy of the layer's experts per layer). Same work list and grid as the FP8
kernel below; weight tiles of another dtype are cast in VMEM.

FP8 (inference): our own kernel over the work list of `schedule.row_tile_schedule`, scalar-
prefetched into SMEM and driving the block index maps; grid (N tiles, live items, K tiles) with
the item count a runtime grid bound. Each item accumulates its (row tile, group) product in a
float32 VMEM scratch over the K steps; weight tiles are decoded from e4m3 in VMEM and scaled by
their 128 x 128 block scales (fp8/tpu.py), and at the last K step the item writes only its rows
[lo, hi) of the output block. Items of one row tile are consecutive, so the output block stays
in VMEM until every row of it has been written. Items of the virtual group (rows past the sum)
skip the matmul, keep their block indices fixed across K, and write zeros.
"""
from __future__ import annotations

import contextlib
import functools
import importlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsv3_jax.kernels_pallas.cost import mxu_dot, nbytes
from dsv3_jax.kernels_pallas.fp8 import tpu as fp8_tpu
from dsv3_jax.kernels_pallas.grouped_matmul.schedule import group_bounds, row_tile_schedule

__all__ = ["gmm", "tgmm", "gmm_fp8", "gmm_layer", "estimate_items"]

_BLOCK = 128
_NT = (((1,), (1,)), ((), ()))


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _megablox():
  return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _kernel_precision(*xs: jax.Array):
  """Megablox's dots take the ambient default precision, and Mosaic rejects a float32
  contraction ("highest", e.g. a global `jax_default_matmul_precision`) of bf16 operands: bf16
  inputs trace the kernel under "default" (bf16 products are exact in its f32 accumulator)."""
  if any(x.dtype == jnp.bfloat16 for x in xs):
    return jax.default_matmul_precision("default")
  return contextlib.nullcontext()


def _row_tile(t: int, preferred: int) -> int:
  return min(preferred, _cdiv(t, 16) * 16)


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
  return x if x.shape[0] == rows else jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def _clip_sizes(group_sizes: jax.Array, rows: int) -> jax.Array:
  """Group sizes with their sum clipped to `rows`, as our own kernels read them."""
  starts, ends = group_bounds(group_sizes, rows)
  return ends - starts


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "tiles", "interpret"))
def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
        out_dtype=None, tiles: tuple[int, int, int] | None = None,
        interpret: bool = False) -> jax.Array:
  """lhs [T, C] . rhs[g] ([G, C, D], or [G, D, C] with transpose_rhs) -> [T, D], via megablox.

  tiles = (bm, bk, bn) in megablox's sense (bk, bn multiples of 128 or cut to the whole dim).
  """
  t, c = lhs.shape
  d = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tm, tk, tn = tiles or (512, 512, 512)
  tm = _row_tile(t, tm)
  tk, tn = fp8_tpu.tile_size(c, tk), fp8_tpu.tile_size(d, tn)
  t_pad = _cdiv(t, tm) * tm
  with _kernel_precision(lhs, rhs):
    out = _megablox().gmm(_pad_rows(lhs, t_pad), rhs, _clip_sizes(group_sizes, t),
                          preferred_element_type=out_dtype or lhs.dtype, tiling=(tm, tk, tn),
                          transpose_rhs=transpose_rhs, interpret=interpret)
  _, ends = group_bounds(group_sizes, t)
  rows = jnp.arange(t_pad, dtype=jnp.int32)[:, None]
  return jnp.where(rows < ends[-1], out, jnp.zeros_like(out))[:t]


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype", "tiles", "interpret"))
def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, num_groups: int | None = None,
         out_dtype=None, tiles: tuple[int, int, int] | None = None,
         interpret: bool = False) -> jax.Array:
  """out[g] = lhs_g^T [K, T_g] . dout_g [T_g, N] -> [G, K, N] (empty groups: 0), via megablox."""
  t, k = lhs.shape
  n = dout.shape[1]
  tm, tk, tn = tiles or (512, 512, 512)
  tm = _row_tile(t, tm)
  tk, tn = fp8_tpu.tile_size(k, tk), fp8_tpu.tile_size(n, tn)
  t_pad = _cdiv(t, tm) * tm
  with _kernel_precision(lhs, dout):
    return _megablox().tgmm(_pad_rows(lhs, t_pad).T, _pad_rows(dout, t_pad),
                            _clip_sizes(group_sizes, t),
                            preferred_element_type=out_dtype or lhs.dtype, tiling=(tm, tk, tn),
                            num_actual_groups=num_groups or group_sizes.shape[0],
                            interpret=interpret)


def estimate_items(rows: int, num_groups: int, bm: int) -> float:
  """Expected work items (row tile, group) with rows for `rows` live rows routed uniformly at
  random over `num_groups` groups, each item computing a whole bm-row tile: the static stand-in
  for the runtime count (`schedule.row_tile_schedule`) that a `pl.CostEstimate` needs.

  Closed form: the expected non-empty groups, G (1 - (1 - 1/G)^rows), plus one item per tile
  boundary inside [0, rows), ceil(rows / bm) - 1 (each splits the group that straddles it; a
  group starting exactly on a boundary, which saves one, is rare with random sizes). The
  virtual group's items (rows past the sum) compute nothing and are not counted.
  """
  if rows <= 0:
    return 0.0
  nonempty = num_groups * (1.0 - (1.0 - 1.0 / num_groups) ** rows)
  return nonempty + (-(-rows // bm) - 1)


def _gmm_layer_kernel(tile_ref, group_ref, lo_ref, hi_ref, layer_ref, x_ref, w_ref, o_ref,
                      acc_ref, *, num_groups, k, bk, nk, compute_dtype):
  del layer_ref  # used by the index maps only
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
      row = jax.lax.broadcasted_iota(jnp.int32, w.shape, 0)
      w = jnp.where(row < limit, w, jnp.zeros_like(w))
    acc_ref[...] += mxu_dot(x, w, (((1,), (0,)), ((), ())))

  @pl.when(kk == nk - 1)
  def _():
    rows = tile_ref[item] * acc_ref.shape[0] + jax.lax.broadcasted_iota(jnp.int32,
                                                                        acc_ref.shape, 0)
    mine = (rows >= lo) & (rows < hi)
    old = o_ref[...].astype(jnp.float32)  # select in f32: v5e has no bf16 VPU
    o_ref[...] = jnp.where(mine, acc_ref[...], old).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiles", "interpret", "rows"))
def gmm_layer(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, layer: jax.Array, *,
              out_dtype=None, tiles: tuple[int, int, int] | None = None,
              interpret: bool = False, rows: int | None = None) -> jax.Array:
  """lhs [T, K] . rhs[layer, g] per group -> [T, N], reading rhs [L, G, K, N] in place.

  layer: int32 scalar (may be traced; clipped to [0, L)). lhs bf16/f32; rhs any float dtype
  (tiles cast in VMEM to lhs.dtype). tiles = (bm, bk, bn), multiples of (8, 128, 128) or whole
  dims. rows: live rows the cost estimate assumes (default T), routed uniformly over the groups
  (`estimate_items`); the kernel itself computes only the tiles holding rows of some group.
  Rows past sum(group_sizes) are zero.
  """
  t, k = lhs.shape
  num_layers, num_groups, _, n = rhs.shape
  tm, tk, tn = tiles or (256, 512, 512)
  if tk % _BLOCK or tn % _BLOCK or tm % 8:
    raise ValueError(f"TPU tiles (bm, bk, bn) must be multiples of (8, 128, 128), got {tiles}")
  bm, bk, bn = fp8_tpu.tile_size(t, tm), fp8_tpu.tile_size(k, tk), fp8_tpu.tile_size(n, tn)
  nk, nn = _cdiv(k, bk), _cdiv(n, bn)
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  sched = row_tile_schedule(group_sizes, t, bm)
  layer = jnp.clip(jnp.asarray(layer, jnp.int32).reshape(1), 0, num_layers - 1)

  def k_of(item, kk, group_ref):  # virtual-group items hold K still: no DMA while they idle
    return jnp.where(group_ref[item] < num_groups, kk, 0)

  def x_map(j, it, kk, tile_ref, group_ref, lo_ref, hi_ref, layer_ref):
    return tile_ref[it], k_of(it, kk, group_ref)

  def w_map(j, it, kk, tile_ref, group_ref, lo_ref, hi_ref, layer_ref):
    return (layer_ref[0], jnp.minimum(group_ref[it], num_groups - 1), k_of(it, kk, group_ref),
            j)

  def o_map(j, it, kk, tile_ref, group_ref, lo_ref, hi_ref, layer_ref):
    return tile_ref[it], j

  items = estimate_items(t if rows is None else min(rows, t), num_groups, bm)
  cost = pl.CostEstimate(
      flops=round(2 * items * bm * k * n), transcendentals=0,
      bytes_accessed=round(nn * items * bm * k * lhs.dtype.itemsize  # x tiles, per N tile
                           + items * k * n * rhs.dtype.itemsize      # the groups' weights
                           + t * n * out_dtype.itemsize))
  kernel = functools.partial(_gmm_layer_kernel, num_groups=num_groups, k=k, bk=bk, nk=nk,
                             compute_dtype=lhs.dtype)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((t, n), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(nn, sched.num_items, nk),
          in_specs=[pl.BlockSpec((bm, bk), x_map),
                    pl.BlockSpec((None, None, bk, bn), w_map)],
          out_specs=pl.BlockSpec((bm, bn), o_map),
          scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="dsv3_grouped_matmul_layer",
      cost_estimate=cost,
  )(sched.tile, sched.group, sched.lo, sched.hi, layer, lhs, rhs)


def _gmm_fp8_kernel(tile_ref, group_ref, lo_ref, hi_ref, layer_ref, *refs, num_groups, k, bm, bk,
                    nk, has_lhs_scale):
  del layer_ref  # used by the index maps only
  if has_lhs_scale:
    x_ref, xs_ref, w_ref, ws_ref, o_ref, acc_ref, wd_ref, xd_ref = refs
  else:
    x_ref, w_ref, ws_ref, o_ref, acc_ref, wd_ref = refs
  item, kk = pl.program_id(1), pl.program_id(2)
  lo, hi = lo_ref[item], hi_ref[item]

  @pl.when(kk == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when((group_ref[item] < num_groups) & (lo < hi))
  def _():
    k_limit = (k - kk * bk) if k % bk else None
    # w_ref is [1, 1, bn, bk]: Mosaic's ref bitcast rejects squeezed block dims.
    fp8_tpu.dequantize_tile(fp8_tpu.as_bytes(w_ref).at[0, 0], ws_ref, wd_ref, k_limit=k_limit)
    if has_lhs_scale:
      fp8_tpu.dequantize_rows(x_ref, xs_ref, xd_ref, k_limit=k_limit)
      x = xd_ref[...]
    else:
      x = x_ref[...] if k_limit is None else fp8_tpu.mask_columns(x_ref[...], k_limit)
    acc_ref[...] += mxu_dot(x, wd_ref[...], _NT)

  @pl.when(kk == nk - 1)
  def _():
    rows = tile_ref[item] * bm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
    mine = (rows >= lo) & (rows < hi)
    old = o_ref[...].astype(jnp.float32)  # select in f32: v5e has no bf16 VPU
    o_ref[...] = jnp.where(mine, acc_ref[...], old).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiles", "interpret", "rows"))
def gmm_fp8(lhs: jax.Array, rhs: jax.Array, rhs_scale: jax.Array, group_sizes: jax.Array, *,
            lhs_scale: jax.Array | None = None, layer: jax.Array | None = None,
            out_dtype=jnp.bfloat16, tiles: tuple[int, int, int] | None = None,
            interpret: bool = False, rows: int | None = None) -> jax.Array:
  """lhs [T, K] . dequant(rhs[g] [N, K])^T per group -> [T, N], weights decoded in VMEM.

  rhs e4m3 [G, N, K] with rhs_scale [G, ceil(N/128), ceil(K/128)]; or, with `layer` (int32
  scalar, may be traced), the stacks [L, G, N, K] and [L, G, ...]: the layer's weight tiles are
  read in place (scalar-prefetched layer index), its scales (a few KiB) sliced outside.
  lhs bf16/f32, or e4m3 with lhs_scale [T, ceil(K/128)]. tiles = (bm, bk, bn), multiples of
  (8, 128, 128) or whole dims. rows: live rows the cost estimate assumes (see `gmm_layer`).
  """
  t, k = lhs.shape
  if layer is None:
    rhs, rhs_scale, layer = rhs[None], rhs_scale[None], 0
  num_layers, num_groups, n, _ = rhs.shape
  layer = jnp.clip(jnp.asarray(layer, jnp.int32).reshape(1), 0, num_layers - 1)
  rhs_scale = jax.lax.dynamic_index_in_dim(rhs_scale, layer[0], 0, keepdims=False)
  tm, tk, tn = tiles or (256, 512, 512)
  if tk % _BLOCK or tn % _BLOCK or tm % 8:
    raise ValueError(f"TPU tiles (bm, bk, bn) must be multiples of (8, 128, 128), got {tiles}")
  bm, bk, bn = fp8_tpu.tile_size(t, tm), fp8_tpu.tile_size(k, tk), fp8_tpu.tile_size(n, tn)
  p, q = _cdiv(bn, _BLOCK), _cdiv(bk, _BLOCK)
  nk = _cdiv(k, bk)
  sched = row_tile_schedule(group_sizes, t, bm)
  has_lhs_scale = lhs_scale is not None
  compute_dtype = jnp.float32 if lhs.dtype == jnp.float32 else jnp.bfloat16

  def k_of(item, kk, group_ref):  # virtual-group items hold K still: no DMA while they idle
    return jnp.where(group_ref[item] < num_groups, kk, 0)

  def rhs_group(item, group_ref):
    return jnp.minimum(group_ref[item], num_groups - 1)

  def x_map(j, it, kk, tile_ref, group_ref, lo_ref, hi_ref, layer_ref):
    return tile_ref[it], k_of(it, kk, group_ref)

  def xs_map(j, it, kk, tile_ref, group_ref, lo_ref, hi_ref, layer_ref):
    return k_of(it, kk, group_ref), tile_ref[it], 0

  def w_map(j, it, kk, tile_ref, group_ref, lo_ref, hi_ref, layer_ref):
    return layer_ref[0], rhs_group(it, group_ref), j, k_of(it, kk, group_ref)

  def ws_map(j, it, kk, tile_ref, group_ref, lo_ref, hi_ref, layer_ref):
    return rhs_group(it, group_ref), j, k_of(it, kk, group_ref), 0, 0

  def o_map(j, it, kk, tile_ref, group_ref, lo_ref, hi_ref, layer_ref):
    return tile_ref[it], j

  in_specs = [pl.BlockSpec((bm, bk), x_map)]
  operands = [lhs]  # e4m3 operands stay float8: the kernel views their refs as int8
  scratch = [pltpu.VMEM((bm, bn), jnp.float32), pltpu.VMEM((bn, bk), compute_dtype)]
  if has_lhs_scale:
    in_specs.append(pl.BlockSpec((None, bm, q), xs_map))
    operands.append(fp8_tpu.group_row_scales(lhs_scale, bk))
    scratch.append(pltpu.VMEM((bm, bk), compute_dtype))
  in_specs += [pl.BlockSpec((1, 1, bn, bk), w_map),
               pl.BlockSpec((None, None, None, p, q), ws_map)]
  operands += [rhs,
               fp8_tpu.group_weight_scales(rhs_scale, bn, bk)]

  items = estimate_items(t if rows is None else min(rows, t), num_groups, bm)
  kernel = functools.partial(_gmm_fp8_kernel, num_groups=num_groups, k=k, bm=bm, bk=bk, nk=nk,
                             has_lhs_scale=has_lhs_scale)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((t, n), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(_cdiv(n, bn), sched.num_items, nk),
          in_specs=in_specs,
          out_specs=pl.BlockSpec((bm, bn), o_map),
          scratch_shapes=scratch,
      ),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "arbitrary", "arbitrary")),
      interpret=interpret,
      name="dsv3_grouped_matmul_fp8",
      cost_estimate=pl.CostEstimate(
          flops=round(2 * items * bm * k * n), transcendentals=0,
          bytes_accessed=round(_cdiv(n, bn) * items * bm * k * lhs.dtype.itemsize
                               + items * k * n + nbytes(*operands[1:-2], operands[-1])
                               + t * n * jnp.dtype(out_dtype).itemsize)),
  )(sched.tile, sched.group, sched.lo, sched.hi, layer, *operands)
