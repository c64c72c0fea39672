"""Block-scaled FP8 GEMM for Hopper GPUs: Pallas Mosaic GPU (e4m3 wgmma + TMA, sm90 only).

out[m, n] = sum_kb a_scale[m, kb] * b_scale[n // 128, kb] * (a[m, kb-block] . b[n, kb-block])

A persistent kernel: one CTA (one warpgroup) per SM loops (`plgpu.nd_loop`, L2-friendly snake
order) over (M tile, N tile) pairs. For each pair a TMA pipeline (`plgpu.emit_pipeline`,
`max_concurrent_steps` stages) streams PAIRS of 128-wide K blocks: per step the even block and
the odd block of a [bm, 128] and b [bn, 128] (both K-major; b reaches wgmma through
`ref.transpose`), plus the two activation-scale rows of the pair (a_scale is passed
transposed, [Kb, M], so a block's row scales are one contiguous TMA box).

Per-128-K promotion, overlapped with the tensor cores (two float32 wgmma accumulators P0, P1 and a
float32 register total T; every wgmma goes into a zeroed accumulator):

  step s:  wgmma(P0 += A[2s] B[2s]^T)         async
           wait until <= 1 wgmma in flight      -> P1 (block 2s-1, previous step) is done
           T += P1 * rowscale(2s-1); P1 = 0     while the block-2s wgmma runs
           wgmma(P1 += A[2s+1] B[2s+1]^T)     async
           wait until <= 1 in flight            -> P0 done
           T += P0 * rowscale(2s); P0 = 0       while the block-2s+1 wgmma runs
  after the last step: wait all, T += P1 * rowscale(last).

The wgmma of a step is still reading shared memory when the step ends, so the inputs use
`delay_release=1` (a slot is refilled one step later, after the wait above). rowscale(kb) =
a_scale[rows, kb] * b_scale[n tile's block, kb]; bn divides 128, so a tile lies in one weight
scale block. The epilogue writes out_dtype through shared memory with a TMA store per
power-of-two row chunk (partial M tiles). Registers: three [bm, bn] float32 sets per thread
(3 * bm * bn / 128) plus the pipeline's: compiled for sm_90a (bench/gpu_aot.py), 64 x 128 tiles
took 255 registers and spilled 184 bytes, 64 x 64 tiles take 157 and spill nothing.

Constraints (`unsupported_reason`; the dispatcher falls back to Triton): e4m3 x e4m3, K a
multiple of 256 (pairs of 128 blocks), N a multiple of some bn in (128, 64, 32, 16), M a multiple
of 8 (TMA row tiling, as the grouped matmul).

Interpret mode (CPU tests) runs the same kernel in Mosaic GPU's interpreter; layout hints are
hardware-only and transposed wgmma operands go through `wgmma_t`'s copy (see
`dsv3_jax.kernels_pallas.grouped_matmul.mosaic_gpu`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dsv3_jax.kernels_pallas.fp8.reference import BLOCK, cdiv
from dsv3_jax.kernels_pallas.mosaic_common import (grid_size, interpret_context, load_ref,
                                                   loop_index, named, snake, store_rows,
                                                   warpgroup_compiler_params, wgmma_t)

__all__ = ["fp8_matmul", "unsupported_reason", "pick_block_n", "DEFAULT_CONFIG", "K_STEP"]

# (block_m, block_n, max_concurrent_steps, grid_tile_width); block_n 64: no ptxas spills (see the
# module docstring); sweep on the H100. Shared memory
# per stage: 2 * 128 * (block_m + block_n) bytes (+ 8 * block_m for the scales).
DEFAULT_CONFIG = (64, 64, 4, 8)
K_STEP = 2 * BLOCK  # K consumed per pipeline step (two scale blocks)


def pick_block_n(n: int, want: int = 128) -> int | None:
  """Largest bn <= want in (128, 64, 32, 16) dividing n, or None."""
  for bn in (128, 64, 32, 16):
    if bn <= want and n % bn == 0:
      return bn
  return None


def unsupported_reason(a_dtype, b_dtype, m: int, n: int, k: int) -> str | None:
  """Why the Mosaic GPU FP8 GEMM cannot run these operands (None when it can)."""
  if jnp.dtype(a_dtype) != jnp.float8_e4m3fn or jnp.dtype(b_dtype) != jnp.float8_e4m3fn:
    return f"Mosaic GPU FP8 GEMM takes e4m3 x e4m3 (weight-only FP8 is Triton), got " \
           f"{a_dtype} x {b_dtype}"
  if k % K_STEP:
    return f"Mosaic GPU FP8 GEMM needs K={k} a multiple of {K_STEP} (pairs of 128-wide K blocks)"
  if pick_block_n(n) is None:
    return f"Mosaic GPU FP8 GEMM needs N={n} a multiple of 16"
  if m % 8:
    return f"Mosaic GPU FP8 GEMM needs M={m} a multiple of 8 (TMA row tiling)"
  return None


def _wgmma_zeros(shape, interpret: bool, layout=None) -> jax.Array:
  zeros = jnp.zeros(shape, jnp.float32)
  return zeros if interpret else plgpu.layout_cast(zeros, layout or plgpu.Layout.WGMMA)


def _acc_reset(acc_ref) -> None:
  """Sets a wgmma accumulator to zero (registers, fenced before the next wgmma)."""
  zeros = _wgmma_zeros(acc_ref.shape, False)
  store = getattr(plgpu, "wgmma_accumulator_store", None)
  if store is None:
    try:
      from jax._src.pallas.mosaic_gpu.primitives import wgmma_accumulator_store as store
    except ImportError:  # pragma: no cover - depends on the jax version
      store = None
  if store is None:  # pragma: no cover
    acc_ref[...] = zeros  # older jax: a swap on an accumulator ref
  else:
    store(acc_ref, zeros)


def _fresh_wgmma(a_smem, b_smem, shape) -> jax.Array:
  """Interpret mode: a_smem . b_smem^T in a new accumulator (this jax's Mosaic GPU interpreter
  cannot reset an accumulator; it runs wgmma synchronously, so the value is final)."""
  def scope(acc_ref):
    wgmma_t(acc_ref, a_smem, b_smem, transpose_b=True, interpret=True)
    return acc_ref[...]

  return pl.run_scoped(scope, plgpu.ACC(shape, jnp.float32))


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def fp8_matmul(a: jax.Array, a_scale: jax.Array, b: jax.Array, b_scale: jax.Array, *,
               out_dtype=jnp.bfloat16, config: tuple[int, int, int, int] | None = None,
               interpret: bool = False) -> jax.Array:
  """Block-scaled FP8 GEMM on Hopper (see the module docstring).

  Args:
    a: [M, K] float8_e4m3fn, a_scale: [M, K/128] float32 (1 x 128 tiles).
    b: [N, K] float8_e4m3fn ([out, in]), b_scale: [ceil(N/128), K/128] float32.
    out_dtype: output dtype (bfloat16 by default); accumulation is float32.
    config: (block_m, block_n, max_concurrent_steps, grid_tile_width); block_m in (64, 128),
      block_n is cut to a divisor of N in (128, 64, 32, 16). Default `DEFAULT_CONFIG`.
    interpret: run in Mosaic GPU interpret mode (CPU).

  Returns:
    [M, N] out_dtype. Raises ValueError for operands `unsupported_reason` rejects.
  """
  m, k = a.shape
  n = b.shape[0]
  reason = unsupported_reason(a.dtype, b.dtype, m, n, k)
  if reason:
    raise ValueError(reason)
  bm, want_bn, steps, width = config or DEFAULT_CONFIG
  bn = pick_block_n(n, want_bn)
  if bn is None or BLOCK % bn or bm not in (64, 128) or steps < 2:
    raise ValueError(f"bad config {config}: block_m in (64, 128), block_n dividing {BLOCK} and "
                     f"N={n}, max_concurrent_steps >= 2")
  grid_m, grid_n, kb = cdiv(m, bm), n // bn, k // BLOCK
  a_scale_t = a_scale.astype(jnp.float32).T  # [Kb, M]: a K block's row scales are contiguous
  row_layout = None if interpret else plgpu.Layout.WGMMA.reduce(1)

  def row_scale(as_smem, j, bscale):
    """[bm] float32 scales of K block j of the step (rows of the tile) times the block scale."""
    if interpret:  # layouts are a hardware notion; the interpreter has plain arrays
      s = as_smem[j, :]
    else:
      s = load_ref(as_smem.at[j], layout=row_layout)
    return s * bscale

  def promote(total, part, scale):
    return total + part * lax.broadcast_in_dim(scale, (bm, bn), (0,))

  def body(a_gmem, as_gmem, b_gmem, bs_gmem, o_gmem):
    @plgpu.nd_loop((grid_m * grid_n,), collective_axes="sm")
    def _loop(info):
      mi, ni = snake(loop_index(info)[0], (grid_m, grid_n), width)
      nb = (ni * bn) // BLOCK

      def acc_scope(acc0, acc1):
        def step(idx, a0, a1, as_smem, b0, b1, carry):
          total, pending, pending_scale = carry
          kk = 2 * idx[0]
          scale0 = row_scale(as_smem, 0, bs_gmem[nb, kk])
          scale1 = row_scale(as_smem, 1, bs_gmem[nb, kk + 1])
          if interpret:  # same promotion order, with the pending product carried as a value
            part0 = _fresh_wgmma(a0, b0, (bm, bn))
            total = promote(total, pending, pending_scale)
            pending = _fresh_wgmma(a1, b1, (bm, bn))
            return promote(total, part0, scale0), pending, scale1
          wgmma_t(acc0, a0, b0, transpose_b=True)
          # <= 1 group in flight: block kk-1 (acc1) is done, block kk runs during the promotion.
          total = promote(total, plgpu.wgmma_accumulator_load(acc1, wait_n=1), pending_scale)
          _acc_reset(acc1)
          wgmma_t(acc1, a1, b1, transpose_b=True)
          total = promote(total, plgpu.wgmma_accumulator_load(acc0, wait_n=1), scale0)
          _acc_reset(acc0)
          return total, None, scale1

        def spec(shape, index_map):
          return plgpu.BlockSpec(shape, index_map, delay_release=1)

        total, pending, pending_scale = plgpu.emit_pipeline(
            step,
            grid=(kb // 2,),
            in_specs=[
                spec((bm, BLOCK), lambda s: (mi, 2 * s)),
                spec((bm, BLOCK), lambda s: (mi, 2 * s + 1)),
                spec((2, bm), lambda s: (s, mi)),
                spec((bn, BLOCK), lambda s: (ni, 2 * s)),
                spec((bn, BLOCK), lambda s: (ni, 2 * s + 1)),
            ],
            max_concurrent_steps=steps,
            init_carry=(_wgmma_zeros((bm, bn), interpret),
                        _wgmma_zeros((bm, bn), True) if interpret else None,
                        _wgmma_zeros((bm,), interpret, row_layout)),
        )(a_gmem, a_gmem, as_gmem, b_gmem, b_gmem)
        if not interpret:
          pending = plgpu.wgmma_accumulator_load(acc1, wait_n=0)
        return promote(total, pending, pending_scale)

      acc = pl.run_scoped(acc_scope, plgpu.ACC((bm, bn), jnp.float32),
                          plgpu.ACC((bm, bn), jnp.float32))

      def store_scope(o_smem):
        o_smem[...] = acc.astype(o_smem.dtype)
        plgpu.commit_smem()
        row0 = mi * bm
        store_rows(o_smem, o_gmem, row0, 0, jnp.minimum(bm, m - row0), pl.ds(ni * bn, bn),
                    min(bm, m))

      pl.run_scoped(store_scope, plgpu.SMEM((bm, bn), o_gmem.dtype))

  kernel = plgpu.kernel(
      named(body, "dsv3_fp8_matmul"), out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(grid_size(interpret),),
      grid_names=("sm",), compiler_params=warpgroup_compiler_params())
  with interpret_context(interpret):
    return kernel(a, a_scale_t, b, b_scale.astype(jnp.float32))
