"""Grouped matmul kernels for Hopper GPUs: Pallas Mosaic GPU (wgmma + TMA, NVIDIA sm90 only).

`gmm`: persistent kernel, one CTA per SM looping (`plgpu.nd_loop`) over (work item, N tile)
pairs, where a work item is a (row tile, group) pair from `schedule.row_tile_schedule` (read
from small int32 arrays in global memory). Each pair runs a TMA + wgmma pipeline
(`plgpu.emit_pipeline`, `max_concurrent_steps` stages) over K into a float32 wgmma accumulator,
then stores only the item's rows [lo, hi) through a ladder of power-of-two-row TMA stores (a TMA
descriptor needs a static box; any row count is a sum of powers of two). The virtual group of rows
past sum(group_sizes) skips the pipeline and stores zeros, so no extra pass over the output.
With transpose_rhs the [G, D, C] weight tile is fed to wgmma through `ref.transpose`
(never materialised): the dlhs product of the backward pass.

`tgmm`: out[g] = lhs_g^T . dout_g, a persistent loop over (group, K tile, N tile); each step of
the pipeline brings bt rows of lhs and dout, rows outside the group are zeroed (select, so the
garbage past T that a TMA box may cover never leaks) in shared memory, and wgmma consumes the lhs
tile transposed. Empty groups store zeros.

Constraints (checked by `unsupported_reason`, which the dispatcher uses to fall back to Triton):
operands bf16/f16 of one dtype with out_dtype equal to it (wgmma on f32 would be tf32, weaker
than the HIGHEST-precision contract), contraction a multiple of block_k and output columns a
multiple of block_n (gmm), K and N multiples of the tile (tgmm), T a multiple of 8 (TMA row
tiling). Row tiles need no padding: TMA zero-fills loads past the end and clips stores.

Interpret mode (CPU tests) runs the same kernels in Mosaic GPU's interpreter with out-of-bounds
reads allowed (hardware TMA semantics) and NaN-filled uninitialised memory.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dsv3_jax.kernels_pallas.grouped_matmul.schedule import group_bounds, row_tile_schedule
from dsv3_jax.kernels_pallas.mosaic_common import (grid_size, interpret_context, loop_index, named,
                                                   snake, store_rows, warpgroup_compiler_params,
                                                   wgmma_iota, wgmma_t)

__all__ = ["gmm", "tgmm", "unsupported_reason", "DEFAULT_GMM_TILES", "DEFAULT_TGMM_TILES"]

# (block_m, block_k, block_n, max_concurrent_steps, grid_block_n); sweep on the H100.
DEFAULT_GMM_TILES = (128, 64, 128, 4, 8)
# (block_t, block_k, block_n, max_concurrent_steps, grid_block_n) for tgmm.
DEFAULT_TGMM_TILES = (64, 128, 128, 4, 8)
_MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def unsupported_reason(lhs_dtype, rhs_dtype, out_dtype, c: int, d: int, *, tgmm: bool = False,
                       tiles=None, rows: int = 0) -> str | None:
  """Why the Mosaic GPU kernel cannot run these operands (None when it can).

  gmm: c = contraction size, d = output columns. tgmm: c = K (lhs columns), d = N. rows = T.
  """
  if rows % 8:
    return f"Mosaic GPU grouped matmul needs T={rows} a multiple of 8 (TMA row tiling)"
  dt = jnp.dtype(lhs_dtype)
  if dt not in _MOSAIC_DTYPES or jnp.dtype(rhs_dtype) != dt:
    return f"Mosaic GPU grouped matmul takes bf16/f16 operands of one dtype, got {lhs_dtype}, " \
           f"{rhs_dtype}"
  if jnp.dtype(out_dtype) != dt:
    return f"Mosaic GPU grouped matmul writes its operand dtype {dt}, asked for {out_dtype}"
  if tgmm:
    _, bk, bn, _, _ = tiles or DEFAULT_TGMM_TILES
    if c % bk or d % bn:
      return f"tgmm needs K={c} a multiple of {bk} and N={d} a multiple of {bn}"
  else:
    _, bk, bn, _, _ = tiles or DEFAULT_GMM_TILES
    if c % bk or d % bn:
      return f"gmm needs the contraction {c} a multiple of {bk} and the output width {d} a " \
             f"multiple of {bn}"
  return None


@functools.partial(jax.jit, static_argnames=("transpose_rhs", "tiles", "interpret"))
def gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, transpose_rhs: bool = False,
        tiles: tuple[int, int, int, int, int] | None = None,
        interpret: bool = False) -> jax.Array:
  """Grouped matmul lhs [T, C] . rhs[g] -> [T, D] in lhs.dtype (bf16/f16), float32 accumulate.

  rhs is [G, C, D], or [G, D, C] with transpose_rhs. tiles = (block_m, block_k, block_n,
  max_concurrent_steps, grid_block_n); C % block_k == 0 and D % block_n == 0 (see
  `unsupported_reason`). Rows past sum(group_sizes) are zero.
  """
  t, c = lhs.shape
  num_groups = rhs.shape[0]
  d = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  bm, bk, bn, steps, grid_bn = tiles or DEFAULT_GMM_TILES
  reason = unsupported_reason(lhs.dtype, rhs.dtype, lhs.dtype, c, d, tiles=(bm, bk, bn, 0, 0),
                              rows=t)
  if reason:
    raise ValueError(reason)
  sched = row_tile_schedule(group_sizes, t, bm)
  n_items = sched.tile.shape[0]
  grid_n = d // bn

  def body(tile_ref, group_ref, lo_ref, hi_ref, lhs_gmem, rhs_gmem, o_gmem):
    @plgpu.nd_loop((n_items * grid_n,), collective_axes="sm")
    def _loop(info):
      item, ni = snake(loop_index(info)[0], (n_items, grid_n), grid_bn)
      tile, group, lo, hi = tile_ref[item], group_ref[item], lo_ref[item], hi_ref[item]
      g = jnp.minimum(group, num_groups - 1)

      def acc_scope(acc_ref):
        @pl.when((group < num_groups) & (lo < hi))
        def _():
          def step(_, a_smem, b_smem):
            wgmma_t(acc_ref, a_smem, b_smem, transpose_b=transpose_rhs, interpret=interpret)

          plgpu.emit_pipeline(
              step,
              grid=(c // bk,),
              in_specs=[
                  plgpu.BlockSpec((bm, bk), lambda kk: (tile, kk), delay_release=1),
                  plgpu.BlockSpec((bn, bk) if transpose_rhs else (bk, bn),
                                  (lambda kk: (ni, kk)) if transpose_rhs else
                                  (lambda kk: (kk, ni)), delay_release=1),
              ],
              max_concurrent_steps=steps,
          )(lhs_gmem, rhs_gmem.at[g])
        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn), jnp.float32))

      def store_scope(o_smem):
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        row0 = tile * bm
        store_rows(o_smem, o_gmem, row0, lo - row0, hi - lo, pl.ds(ni * bn, bn), min(bm, t))

      pl.run_scoped(store_scope, plgpu.SMEM((bm, bn), o_gmem.dtype))

  kernel = plgpu.kernel(
      named(body, "dsv3_grouped_matmul"), out_type=jax.ShapeDtypeStruct((t, d), lhs.dtype),
      grid=(grid_size(interpret),),
      grid_names=("sm",), compiler_params=warpgroup_compiler_params())
  with interpret_context(interpret):
    return kernel(sched.tile, sched.group, sched.lo, sched.hi, lhs, rhs)


@functools.partial(jax.jit, static_argnames=("num_groups", "tiles", "interpret"))
def tgmm(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *,
         num_groups: int | None = None, tiles: tuple[int, int, int, int, int] | None = None,
         interpret: bool = False) -> jax.Array:
  """out[g] = lhs_g^T [K, T_g] . dout_g [T_g, N] -> [G, K, N] in lhs.dtype (bf16/f16).

  tiles = (block_t, block_k, block_n, max_concurrent_steps, grid_block_n); K % block_k == 0 and
  N % block_n == 0. Empty groups give zeros.
  """
  t, k = lhs.shape
  n = dout.shape[1]
  num_groups = num_groups or group_sizes.shape[0]
  bt, bk, bn, steps, grid_bn = tiles or DEFAULT_TGMM_TILES
  reason = unsupported_reason(lhs.dtype, dout.dtype, lhs.dtype, k, n, tgmm=True,
                              tiles=(bt, bk, bn, 0, 0), rows=t)
  if reason:
    raise ValueError(reason)
  starts, ends = group_bounds(group_sizes, t)
  grid_k, grid_n = k // bk, n // bn

  def body(start_ref, end_ref, lhs_gmem, dout_gmem, o_gmem):
    @plgpu.nd_loop((num_groups, grid_k * grid_n), collective_axes="sm")
    def _loop(info):
      g, lin = loop_index(info)
      ki, ni = snake(lin, (grid_k, grid_n), grid_bn)
      start, end = start_ref[g], end_ref[g]
      first = start // bt
      num_t = (end + bt - 1) // bt - first

      def acc_scope(acc_ref):
        def step(idx, x_smem, dy_smem):
          row0 = (first + idx[0]) * bt

          @pl.when((row0 < start) | (row0 + bt > end))
          def _():  # a block straddling the group's edges (or T): zero the foreign rows
            rows = row0 + wgmma_iota((bt, bk), 0, interpret)
            x = x_smem[...]
            x_smem[...] = jnp.where((rows >= start) & (rows < end), x, jnp.zeros_like(x))

            @pl.when(row0 + bt > t)
            def _():  # rows past T (TMA fill) in dout too: 0 * inf/nan must not reach acc
              dy_rows = row0 + wgmma_iota((bt, bn), 0, interpret)
              dy = dy_smem[...]
              dy_smem[...] = jnp.where(dy_rows < t, dy, jnp.zeros_like(dy))

            plgpu.commit_smem()

          wgmma_t(acc_ref, x_smem, dy_smem, transpose_a=True, interpret=interpret)
          if steps == 1:  # no delayed release: the next copy would overwrite live operands
            plgpu.wgmma_wait(0)

        @pl.when(end > start)
        def _():
          release = 1 if steps > 1 else 0
          plgpu.emit_pipeline(
              step,
              grid=(num_t,),
              in_specs=[
                  plgpu.BlockSpec((bt, bk), lambda s: (first + s, ki), delay_release=release),
                  plgpu.BlockSpec((bt, bn), lambda s: (first + s, ni), delay_release=release),
              ],
              max_concurrent_steps=steps,
          )(lhs_gmem, dout_gmem)
        return acc_ref[...]

      acc = pl.run_scoped(acc_scope, plgpu.ACC((bk, bn), jnp.float32))

      def store_scope(o_smem):
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[g, pl.ds(ki * bk, bk), pl.ds(ni * bn, bn)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

      pl.run_scoped(store_scope, plgpu.SMEM((bk, bn), o_gmem.dtype))

  kernel = plgpu.kernel(
      named(body, "dsv3_transposed_grouped_matmul"),
      out_type=jax.ShapeDtypeStruct((num_groups, k, n), lhs.dtype),
      grid=(grid_size(interpret),), grid_names=("sm",), compiler_params=warpgroup_compiler_params())
  with interpret_context(interpret):
    return kernel(starts, ends, lhs, dout)
