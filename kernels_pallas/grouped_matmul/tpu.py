"""Grouped matmul kernels for TPUs (Mosaic).

bf16/f32 (training and the serving stacks): our own `gmm` / `tgmm` (tpu_train.py), over the
work list of `schedule`, computing only the row tiles that hold rows of some group; `gmm_layer`
is `gmm` reading the whole scanned stack [L, G, K, N] at a layer index scalar-prefetched into
SMEM (the weight BlockSpec's index map picks (layer, group, K tile, N tile), so only that layer's
tiles of the groups that have rows cross HBM and the stack is never sliced: XLA cannot fuse a
dynamic-slice into a custom call and would materialise a copy of the layer's experts).

FP8 (inference): our own kernel over the same work list, grid (N tiles, live items, K tiles)
with the item count a runtime grid bound. Each item accumulates its (row tile, group) product in
a float32 VMEM scratch over the K steps; weight tiles are decoded from e4m3 in VMEM and scaled
by their 128 x 128 block scales (fp8/tpu.py), and at the last K step the item writes only its
rows [lo, hi) of the output block. Items of one row tile are consecutive, so the output block
stays in VMEM until every row of it has been written. Items of the virtual group (rows past the
sum) skip the matmul, keep their block indices fixed across K, and write zeros.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsv3_jax.kernels_pallas.cost import mxu_dot, nbytes
from dsv3_jax.kernels_pallas.fp8 import tpu as fp8_tpu
from dsv3_jax.kernels_pallas.grouped_matmul.schedule import estimate_items, row_tile_schedule
from dsv3_jax.kernels_pallas.grouped_matmul.tpu_train import gmm, tgmm

__all__ = ["gmm", "tgmm", "gmm_fp8", "gmm_layer", "estimate_items"]

_BLOCK = 128
_NT = (((1,), (1,)), ((), ()))
LAYER_TILES = (256, 512, 512)  # decode steps: few rows; (bm, bk, bn)


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def gmm_layer(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, layer: jax.Array, *,
              out_dtype=None, tiles: tuple[int, int, int] | None = None,
              interpret: bool = False, rows: int | None = None) -> jax.Array:
  """lhs [T, K] . rhs[layer, g] per group -> [T, N], reading rhs [L, G, K, N] in place.

  layer: int32 scalar (may be traced; clipped to [0, L)). lhs bf16/f32; rhs any float dtype
  (tiles cast in VMEM to lhs.dtype). tiles = (bm, bk, bn), multiples of (8, 128, 128) or whole
  dims (default LAYER_TILES). rows: live rows the cost estimate assumes (default T), routed
  uniformly over the groups (`estimate_items`); the kernel itself computes only the tiles
  holding rows of some group. Rows past sum(group_sizes) are zero.
  """
  return gmm(lhs, rhs, group_sizes, layer, out_dtype=out_dtype, tiles=tiles or LAYER_TILES,
             interpret=interpret, rows=rows)


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
