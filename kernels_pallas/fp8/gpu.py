"""FP8 kernels for GPUs: Pallas Triton lowering (NVIDIA sm89+ FP8 tensor cores; also ROCm).

Every kernel passes `plt.CompilerParams`, which pins the Triton lowering (on jax 0.11 a plain
`pallas_call` on GPU would pick Mosaic GPU). Operands are whole-array refs in global memory; each
program loads power-of-two tiles with explicit masks, so partial edge tiles (M, N, K not multiples
of the tile) read zeros and never store out of bounds.

fp8 x fp8 products run on the FP8 tensor cores with a float32 result per 128-wide K step, which
is then multiplied by its row (activation) and block (weight) scales and added to a float32
accumulator: the per-128-K scale promotion of DeepSeek-V3's block-scaled GEMM.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsv3_jax.kernels_pallas.fp8.reference import BLOCK, E4M3_MAX, cdiv, tile_scales

__all__ = ["quantize_activations", "fp8_matmul", "edge_mask", "tile_mask", "masked_load",
           "masked_store", "swizzle"]

_NT = (((1,), (1,)), ((), ()))  # contract the last dim of both operands: a [m, k] . b [n, k]


def _pow2_tile(n: int, lo: int, hi: int) -> int:
  return max(lo, min(hi, pl.next_power_of_2(n)))


def edge_mask(start, size: int, limit: int):
  """[size] bool of start + i < limit, or None when every tile is full (no masking needed)."""
  return None if limit % size == 0 else start + jnp.arange(size) < limit


def tile_mask(rows, cols):
  """2D mask from optional row / column masks (None: all true)."""
  if rows is None:
    return None if cols is None else cols[None, :]
  return rows[:, None] if cols is None else rows[:, None] & cols[None, :]


def swizzle(pid, rows: int, cols: int, group: int = 8):
  """Maps a 1-D program id to (row tile, col tile) in groups of `group` row tiles.

  Programs that run together then share `group` row tiles and a band of column tiles in L2,
  instead of one row tile against every column tile (or the reverse), which would stream one
  operand from HBM once per tile of the other.
  """
  per_group = group * cols
  first = (pid // per_group) * group
  size = jnp.minimum(rows - first, group)
  local = pid % per_group
  return first + local % size, local // size


def masked_load(ref, mask):
  return plt.load(ref) if mask is None else plt.load(ref, mask=mask, other=0.0)


def masked_store(ref, value, mask):
  if mask is None:
    plt.store(ref, value)
  else:
    plt.store(ref, value, mask=mask)


@functools.partial(jax.jit, static_argnames=("block", "power_of_two_scale", "block_rows",
                                             "interpret"))
def quantize_activations(x: jax.Array, *, block: int = BLOCK, power_of_two_scale: bool = False,
                         block_rows: int | None = None,
                         interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """x [M, K] -> (float8_e4m3fn [M, K], float32 [M, ceil(K/block)]); one program per bm x block.

  block_rows: rows per program (a power of two; default up to 64).
  """
  m, k = x.shape
  bm = block_rows or _pow2_tile(m, 1, 64)
  if block & (block - 1) or bm & (bm - 1):
    raise ValueError(f"the Triton kernel needs power-of-two tiles, got block={block}, "
                     f"block_rows={bm}")
  kb = cdiv(k, block)

  def kernel(x_ref, q_ref, s_ref):
    i, j = pl.program_id(0), pl.program_id(1)
    rmask = edge_mask(i * bm, bm, m)
    mask = tile_mask(rmask, edge_mask(j * block, block, k))
    tile = (pl.ds(i * bm, bm), pl.ds(j * block, block))
    xf = masked_load(x_ref.at[tile], mask).astype(jnp.float32)
    scale = tile_scales(jnp.max(jnp.abs(xf), axis=1), power_of_two_scale)
    q = jnp.clip(xf / scale[:, None], -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
    masked_store(q_ref.at[tile], q, mask)
    masked_store(s_ref.at[pl.ds(i * bm, bm), j], scale, rmask)

  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((m, k), jnp.float8_e4m3fn),
                 jax.ShapeDtypeStruct((m, kb), jnp.float32)),
      grid=(cdiv(m, bm), kb),
      compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
      interpret=interpret,
      name="dsv3_fp8_quantize",
  )(x)


def _matmul_kernel(*refs, m, n, k, bm, bn, has_a_scale):
  if has_a_scale:
    a_ref, as_ref, b_ref, bs_ref, o_ref = refs
  else:
    a_ref, b_ref, bs_ref, o_ref = refs
  i, j = swizzle(pl.program_id(0), cdiv(m, bm), cdiv(n, bn))
  rmask = edge_mask(i * bm, bm, m)
  cmask = edge_mask(j * bn, bn, n)
  n_block = (j * bn) // BLOCK  # bn divides 128: the tile lies in one weight scale block

  def body(kb, acc):
    kmask = edge_mask(kb * BLOCK, BLOCK, k)
    ks = pl.ds(kb * BLOCK, BLOCK)
    a = masked_load(a_ref.at[pl.ds(i * bm, bm), ks], tile_mask(rmask, kmask))
    b = masked_load(b_ref.at[pl.ds(j * bn, bn), ks], tile_mask(cmask, kmask))
    b_s = bs_ref[n_block, kb]
    if has_a_scale:
      part = jax.lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)
      a_s = masked_load(as_ref.at[pl.ds(i * bm, bm), kb], rmask)
      return acc + part * (a_s[:, None] * b_s)
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    part = jax.lax.dot_general(a, b.astype(a.dtype), _NT, precision=precision,
                               preferred_element_type=jnp.float32)
    return acc + part * b_s

  acc = jax.lax.fori_loop(0, cdiv(k, BLOCK), body, jnp.zeros((bm, bn), jnp.float32))
  masked_store(o_ref.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], acc.astype(o_ref.dtype),
               tile_mask(rmask, cmask))


@functools.partial(jax.jit, static_argnames=("out_dtype", "block_m", "block_n", "interpret"))
def fp8_matmul(a: jax.Array, a_scale: jax.Array | None, b: jax.Array, b_scale: jax.Array, *,
               out_dtype=jnp.bfloat16, block_m: int | None = None, block_n: int | None = None,
               interpret: bool = False) -> jax.Array:
  """a [M, K] (e4m3 with a_scale [M, Kb], or bf16/f32 with a_scale None) . b [N, K]^T -> [M, N].

  b is e4m3 with b_scale [ceil(N/128), Kb]. With a_scale None the weight tile is upcast to a's
  dtype in registers (weight-only FP8) and its block scale applied to the float32 partial product.
  """
  m, k = a.shape
  n = b.shape[0]
  bm = block_m or _pow2_tile(m, 16, 128)
  bn = block_n or _pow2_tile(n, 16, 128)
  if BLOCK % bn or bm & (bm - 1) or bm < 16:
    raise ValueError(f"block_n must divide {BLOCK} and block_m be a power of two >= 16; "
                     f"got block_m={bm}, block_n={bn}")
  kernel = functools.partial(_matmul_kernel, m=m, n=n, k=k, bm=bm, bn=bn,
                             has_a_scale=a_scale is not None)
  operands = (a, a_scale, b, b_scale) if a_scale is not None else (a, b, b_scale)
  big = bm * bn >= 128 * 128
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(cdiv(m, bm) * cdiv(n, bn),),
      compiler_params=plt.CompilerParams(num_warps=8 if big else 4, num_stages=3),
      interpret=interpret,
      name="dsv3_fp8_matmul",
  )(*operands)
