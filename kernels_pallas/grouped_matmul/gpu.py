"""Grouped matmul kernels for GPUs: Pallas Triton lowering (serves NVIDIA and ROCm).

`gmm`: one program per (work item, N tile), where a work item is a (row tile, group) pair from
`schedule.row_tile_schedule`; the map from items to tiles and groups is read from small int32
arrays at the start of each program. A tile that straddles a group boundary is computed once per
group with the rows of other groups masked out of the loads and the store, so every program is a
dense [bm, bn] tensor-core tile over a K loop (unlike a per-row gather). Items past the live
count, and the virtual group of rows past sum(group_sizes), skip the K loop; the latter store
zeros.

`tgmm`: out[g] = lhs_g^T . dout_g, one program per (group, K tile, N tile) looping over the
group's row tiles with the rows outside the group masked to zero; an empty group stores zeros.

Both use a 1-D grid whose program ids are L2-swizzled (`fp8.gpu.swizzle`): programs running
together share a few row tiles and a band of N tiles, so neither operand is streamed from HBM once
per tile of the other. All refs are whole arrays in global memory with masked power-of-two tile
loads, so T, K and N need not be multiples of the tiles. Every call passes
`plt.CompilerParams` (see fp8/gpu.py).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsv3_jax.kernels_pallas.fp8.gpu import (edge_mask, masked_load, masked_store, swizzle,
                                             tile_mask)
from dsv3_jax.kernels_pallas.grouped_matmul.schedule import group_bounds, row_tile_schedule

__all__ = ["gmm", "tgmm", "default_tiles"]

_SCALE_BLOCK = 128


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def _pow2_tile(n: int, lo: int, hi: int) -> int:
  return max(lo, min(hi, pl.next_power_of_2(n)))


def default_tiles(rows: int, dtype, *, fp8: bool = False) -> tuple[int, int, int]:
  """(bm, bk, bn) for H100-class GPUs: 128 x 128 output tiles, K step by operand width."""
  bm = _pow2_tile(rows, 16, 128)
  if fp8:
    return bm, _SCALE_BLOCK, 128
  return bm, (32 if jnp.dtype(dtype).itemsize == 4 else 64), 128


def _compiler_params(bm: int, bn: int) -> plt.CompilerParams:
  return plt.CompilerParams(num_warps=8 if bm * bn >= 128 * 128 else 4, num_stages=3)


def _gmm_kernel(tile_ref, group_ref, lo_ref, hi_ref, *refs, num_groups, c, d, bm, bc, bd,
                transpose_rhs, has_lhs_scale, has_rhs_scale):
  refs = list(refs)
  lhs_ref = refs.pop(0)
  ls_ref = refs.pop(0) if has_lhs_scale else None
  rhs_ref = refs.pop(0)
  rs_ref = refs.pop(0) if has_rhs_scale else None
  (o_ref,) = refs
  item, j = swizzle(pl.program_id(0), tile_ref.shape[0], _cdiv(d, bd))
  tile, group, lo, hi = tile_ref[item], group_ref[item], lo_ref[item], hi_ref[item]
  g = jnp.minimum(group, num_groups - 1)
  row0 = tile * bm
  rows = row0 + jnp.arange(bm)
  rmask = (rows >= lo) & (rows < hi)
  dmask = edge_mask(j * bd, bd, d)
  live = (group < num_groups) & (lo < hi)
  # An int32 product, not jnp.where(live, <python int>, 0): Triton lowers that select to an i1
  # loop bound and the K loop's scf.for fails to verify (bounds of different types).
  num_k = live.astype(jnp.int32) * jnp.int32(_cdiv(c, bc))

  def body(kk, acc):
    kmask = edge_mask(kk * bc, bc, c)
    ks = pl.ds(kk * bc, bc)
    a = masked_load(lhs_ref.at[pl.ds(row0, bm), ks], tile_mask(rmask, kmask))
    if transpose_rhs:  # rhs [G, D, C]
      b = masked_load(rhs_ref.at[g, pl.ds(j * bd, bd), ks], tile_mask(dmask, kmask))
      dims = (((1,), (1,)), ((), ()))
    else:  # rhs [G, C, D]
      b = masked_load(rhs_ref.at[g, ks, pl.ds(j * bd, bd)], tile_mask(kmask, dmask))
      dims = (((1,), (0,)), ((), ()))
    if b.dtype != a.dtype:  # weight-only FP8: exact upcast of e4m3 to the activation dtype
      b = b.astype(a.dtype)
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    part = jax.lax.dot_general(a, b, dims, precision=precision,
                               preferred_element_type=jnp.float32)
    if has_rhs_scale:  # bd divides 128 and bc == 128: one weight scale per (tile, K step)
      part = part * rs_ref[g, (j * bd) // _SCALE_BLOCK, kk]
    if has_lhs_scale:
      part = part * masked_load(ls_ref.at[pl.ds(row0, bm), kk], rmask)[:, None]
    return acc + part

  acc = jax.lax.fori_loop(0, num_k, body, jnp.zeros((bm, bd), jnp.float32))
  masked_store(o_ref.at[pl.ds(row0, bm), pl.ds(j * bd, bd)], acc.astype(o_ref.dtype),
               tile_mask(rmask, dmask))


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "out_dtype", "tiles", "interpret"))
def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
        lhs_scale: jax.Array | None = None, rhs_scale: jax.Array | None = None,
        out_dtype=None, tiles: tuple[int, int, int] | None = None,
        interpret: bool = False) -> jax.Array:
  """Grouped matmul: lhs [T, C] . rhs[g] -> [T, D] out_dtype (default lhs.dtype).

  rhs is [G, C, D], or [G, D, C] with transpose_rhs. FP8: rhs e4m3 [G, D, C] (transpose_rhs)
  with rhs_scale [G, ceil(D/128), ceil(C/128)]; lhs bf16/f32, or e4m3 with lhs_scale
  [T, ceil(C/128)]. tiles = (bm, bk, bn), powers of two (FP8: bk = 128 and bn divides 128).
  """
  t, c = lhs.shape
  num_groups = rhs.shape[0]
  d = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  fp8 = rhs_scale is not None
  bm, bc, bd = tiles or default_tiles(t, lhs.dtype, fp8=fp8)
  if fp8 and (bc != _SCALE_BLOCK or _SCALE_BLOCK % bd or not transpose_rhs):
    raise ValueError(f"FP8 gmm needs rhs [G, N, K] (transpose_rhs), bk = 128 and bn dividing "
                     f"128; got tiles {(bm, bc, bd)}, transpose_rhs={transpose_rhs}")
  sched = row_tile_schedule(group_sizes, t, bm)
  kernel = functools.partial(
      _gmm_kernel, num_groups=num_groups, c=c, d=d, bm=bm, bc=bc, bd=bd,
      transpose_rhs=transpose_rhs, has_lhs_scale=lhs_scale is not None, has_rhs_scale=fp8)
  operands = [lhs] + ([lhs_scale] if lhs_scale is not None else []) + [rhs]
  operands += [rhs_scale] if fp8 else []
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((t, d), out_dtype or lhs.dtype),
      grid=(sched.tile.shape[0] * _cdiv(d, bd),),
      compiler_params=_compiler_params(bm, bd),
      interpret=interpret,
      name="dsv3_grouped_matmul",
  )(sched.tile, sched.group, sched.lo, sched.hi, *operands)


def _tgmm_kernel(start_ref, end_ref, lhs_ref, dout_ref, o_ref, *, k, n, bt, bk, bn):
  pid, nk, nn = pl.program_id(0), _cdiv(k, bk), _cdiv(n, bn)
  g = pid // (nk * nn)  # groups outermost, then L2-swizzled (K tile, N tile) within a group
  i, j = swizzle(pid % (nk * nn), nk, nn)
  start, end = start_ref[g], end_ref[g]
  first = start // bt
  num_t = jnp.where(end > start, (end + bt - 1) // bt - first, 0)
  kmask = edge_mask(i * bk, bk, k)
  nmask = edge_mask(j * bn, bn, n)

  def body(s, acc):
    row0 = (first + s) * bt
    rows = row0 + jnp.arange(bt)
    rmask = (rows >= start) & (rows < end)
    x = masked_load(lhs_ref.at[pl.ds(row0, bt), pl.ds(i * bk, bk)], tile_mask(rmask, kmask))
    dy = masked_load(dout_ref.at[pl.ds(row0, bt), pl.ds(j * bn, bn)], tile_mask(rmask, nmask))
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return acc + jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), precision=precision,
                                     preferred_element_type=jnp.float32)

  acc = jax.lax.fori_loop(0, num_t, body, jnp.zeros((bk, bn), jnp.float32))
  masked_store(o_ref.at[g, pl.ds(i * bk, bk), pl.ds(j * bn, bn)], acc.astype(o_ref.dtype),
               tile_mask(kmask, nmask))


@functools.partial(jax.jit, static_argnames=("num_groups", "out_dtype", "tiles", "interpret"))
def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *, num_groups: int | None = None,
         out_dtype=None, tiles: tuple[int, int, int] | None = None,
         interpret: bool = False) -> jax.Array:
  """Transposed grouped matmul: out[g] = lhs_g^T [K, T_g] . dout_g [T_g, N] -> [G, K, N].

  tiles = (bt, bk, bn): rows per step and the output tile, powers of two.
  """
  t, k = lhs.shape
  n = dout.shape[1]
  num_groups = num_groups or group_sizes.shape[0]
  bt, bk, bn = tiles or (_pow2_tile(t, 16, 64), 128, 128)
  starts, ends = group_bounds(group_sizes, t)
  kernel = functools.partial(_tgmm_kernel, k=k, n=n, bt=bt, bk=bk, bn=bn)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype or lhs.dtype),
      grid=(num_groups * _cdiv(k, bk) * _cdiv(n, bn),),
      compiler_params=_compiler_params(bk, bn),
      interpret=interpret,
      name="dsv3_transposed_grouped_matmul",
  )(starts, ends, lhs, dout)
