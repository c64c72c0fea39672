"""FP8 kernels for TPUs (Mosaic): weight-only FP8 with dequantisation in VMEM.

v5e/v5p/v6e MXUs do not take float8_e4m3fn, so weight tiles are decoded in VMEM, multiplied by
their 128 x 128 block scale, rounded to bf16 (f32 when the activations are f32) and fed to the
MXU; the accumulator is float32. Weights cross HBM as one byte per element, which is the gain
over an XLA dequantise-then-matmul; the decode (a dozen VPU ops per weight) is amortised over
the bm activation rows of the tile, hence the tall default row tile.

e4m3 arrays enter and leave the kernels as float8_e4m3fn; inside, their VMEM refs are
reinterpreted as int8 (`as_bytes`, a ref bitcast; the encoder bitcasts its int8 codes in VMEM
before storing them: no HBM pass, where an XLA
`bitcast_convert_type` outside the kernel compiles to a full read-and-write copy on TPU) and
decoded / encoded with 32-bit integer arithmetic (`e4m3_to_f32`, `f32_to_e4m3`), so nothing here
depends on the chip supporting float8 in its vector unit.

Scales reach the kernel as VMEM blocks whose last two dims are whole arrays (legal for any
size under the (8, 128) block rule): the weight scales are regrouped per (bn, bk) weight tile
into [N/bn, K/bk, bn/128, bk/128] outside the kernel (a few KiB).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsv3_jax.kernels_pallas.cost import estimate, mxu_dot
from dsv3_jax.kernels_pallas.fp8.reference import BLOCK, E4M3_MAX, cdiv, tile_scales

__all__ = ["e4m3_to_f32", "f32_to_e4m3", "quantize_activations", "fp8_matmul", "tile_size",
           "group_weight_scales", "group_row_scales", "dequantize_tile", "dequantize_rows",
           "mask_columns", "as_bytes"]

_NT = (((1,), (1,)), ((), ()))


def e4m3_to_f32(bits: jax.Array) -> jax.Array:
  """Decodes float8_e4m3fn bytes held as int8 (any shape) to float32, exactly.

  The two NaN codes (0x7f, 0xff) decode to +-480; valid checkpoints never contain them.
  """
  u = bits.astype(jnp.int32) & 0xFF
  mag = u & 0x7F
  neg = u >= 0x80
  # Normal numbers: move the 4-bit exponent (bias 7) and 3-bit mantissa into float32's fields.
  normal = jax.lax.bitcast_convert_type((mag << 20) + (120 << 23), jnp.float32)
  # Subnormals (exponent field 0) are mantissa * 2^-9; built directly so that a chip flushing
  # float32 denormals cannot zero them.
  sub = mag.astype(jnp.float32) * (2.0 ** -9)
  val = jnp.where(mag < 8, sub, normal)
  return jnp.where(neg, -val, val)


def f32_to_e4m3(v: jax.Array) -> jax.Array:
  """Encodes float32 with |v| <= 448 to float8_e4m3fn bytes (int8), round to nearest even."""
  a = jnp.abs(v)
  ab = jax.lax.bitcast_convert_type(a, jnp.int32)
  # Normal range: round the 23-bit mantissa to 3 bits (ties to even), rebias 127 -> 7.
  r = (ab + 0x7FFFF + ((ab >> 20) & 1)) >> 20
  normal = r - (120 << 3)
  # Subnormal range |v| < 2^-6: the code is round_half_even(|v| * 2^9) (0..8; 8 is 2^-6), done
  # on the integer significand (a float "+2^23-2^23" trick is not safe from the compiler).
  frac = (ab & 0x7FFFFF) | 0x800000
  shift = jnp.clip(14 - ((ab >> 23) - 127), 1, 31)
  sub = (frac + (1 << (shift - 1)) - 1 + ((frac >> shift) & 1)) >> shift
  code = jnp.where(a < jnp.float32(2.0 ** -6), sub, normal)
  negative = jax.lax.bitcast_convert_type(v, jnp.int32) < 0  # the sign bit, so -0.0 -> 0x80
  code = jnp.where(negative, code | 0x80, code)
  return code.astype(jnp.int8)


def tile_size(dim: int, preferred: int) -> int:
  """`preferred` (a multiple of 128) when dim exceeds it, else the whole dim (always legal)."""
  return preferred if dim > preferred else dim


def group_weight_scales(scale: jax.Array, bn: int, bk: int) -> jax.Array:
  """[..., Nb, Kb] 128x128 block scales -> [..., N/bn, K/bk, bn/128, bk/128] per weight tile.

  bn and bk are multiples of 128 or the whole (smaller) dims; padding scales are 1.
  """
  *lead, nb, kb = scale.shape
  p, q = cdiv(bn, BLOCK), cdiv(bk, BLOCK)
  tn, tk = cdiv(nb, p), cdiv(kb, q)
  pad = [(0, 0)] * len(lead) + [(0, tn * p - nb), (0, tk * q - kb)]
  s = jnp.pad(scale.astype(jnp.float32), pad, constant_values=1.0)
  s = s.reshape(*lead, tn, p, tk, q)
  return jnp.moveaxis(s, -3, -2)


def group_row_scales(scale: jax.Array, bk: int) -> jax.Array:
  """[M, Kb] 1x128 activation scales -> [K/bk, M, bk/128], a legal block per (bm, bk) tile."""
  m, kb = scale.shape
  q = cdiv(bk, BLOCK)
  nk = cdiv(kb, q)
  s = jnp.pad(scale.astype(jnp.float32), ((0, 0), (0, nk * q - kb)), constant_values=1.0)
  return jnp.moveaxis(s.reshape(m, nk, q), 1, 0)


def as_bytes(ref):
  """A float8_e4m3fn ref viewed as int8 (same bytes); int8 refs pass through."""
  return ref.bitcast(jnp.int8) if ref.dtype == jnp.float8_e4m3fn else ref


def dequantize_tile(w_ref, s_ref, out_ref, *, k_limit=None):
  """Decodes the e4m3 tile w_ref [bn, bk] (float8_e4m3fn or its int8 bytes) into out_ref (its
  dtype) using s_ref [p, q] scales.

  k_limit: number of valid columns (a traced scalar) when the tile overhangs K; the rest is 0.
  """
  w_ref = as_bytes(w_ref)
  bn, bk = w_ref.shape
  for i in range(cdiv(bn, BLOCK)):
    rows = slice(i * BLOCK, min(bn, (i + 1) * BLOCK))
    for j in range(cdiv(bk, BLOCK)):
      cols = slice(j * BLOCK, min(bk, (j + 1) * BLOCK))
      w = e4m3_to_f32(w_ref[rows, cols]) * s_ref[i:i + 1, j:j + 1]
      if k_limit is not None:
        col = j * BLOCK + jax.lax.broadcasted_iota(jnp.int32, w.shape, 1)
        w = jnp.where(col < k_limit, w, 0.0)
      out_ref[rows, cols] = w.astype(out_ref.dtype)


def dequantize_rows(x_ref, s_ref, out_ref, *, k_limit=None):
  """Decodes the e4m3 activation tile x_ref [bm, bk] (float8_e4m3fn or int8 bytes) into out_ref
  with s_ref [bm, bk/128]."""
  x_ref = as_bytes(x_ref)
  bk = x_ref.shape[1]
  for j in range(cdiv(bk, BLOCK)):
    cols = slice(j * BLOCK, min(bk, (j + 1) * BLOCK))
    x = e4m3_to_f32(x_ref[:, cols]) * s_ref[:, j:j + 1]
    if k_limit is not None:
      col = j * BLOCK + jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
      x = jnp.where(col < k_limit, x, 0.0)
    out_ref[:, cols] = x.astype(out_ref.dtype)


def mask_columns(x: jax.Array, k_limit) -> jax.Array:
  """Zeroes the columns >= k_limit of a [rows, bk] tile (the overhang past K)."""
  col = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
  return jnp.where(col < k_limit, x, jnp.zeros_like(x))


def _quantize_block_rows(m: int, kp: int) -> int:
  rows = max(32, (1 << 20) // (kp * 4) // 32 * 32)  # ~1 MiB of float32 work per block
  return m if m <= rows else rows


@functools.partial(jax.jit, static_argnames=("block", "power_of_two_scale", "block_rows",
                                             "interpret"))
def quantize_activations(x: jax.Array, *, block: int = BLOCK, power_of_two_scale: bool = False,
                         block_rows: int | None = None,
                         interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """x [M, K] -> (float8_e4m3fn [M, K], float32 [M, ceil(K/block)]); one program per row block.

  Each program holds whole rows (K padded to a multiple of `block` with zeros, only when K is
  not one) and walks their 1 x block tiles. block_rows: rows per program (a multiple of 32).
  """
  if block % 128:
    raise ValueError(f"the TPU kernel needs block to be a multiple of 128, got {block}")
  m, k = x.shape
  kb = cdiv(k, block)
  kp = kb * block
  if kp != k:
    x = jnp.pad(x, ((0, 0), (0, kp - k)))
  bm = _quantize_block_rows(m, kp) if block_rows is None else tile_size(m, block_rows)

  def kernel(x_ref, q_ref, s_ref):
    lane = jax.lax.broadcasted_iota(jnp.int32, (bm, kb), 1)

    def body(j, scales):
      cols = pl.ds(pl.multiple_of(j * block, block), block)
      xf = x_ref[:, cols].astype(jnp.float32)
      s = tile_scales(jnp.max(jnp.abs(xf), axis=1, keepdims=True), power_of_two_scale)
      code = f32_to_e4m3(jnp.clip(xf / s, -E4M3_MAX, E4M3_MAX))
      q_ref[:, cols] = jax.lax.bitcast_convert_type(code, jnp.float8_e4m3fn)  # in VMEM: free
      return jnp.where(lane == j, s, scales)

    s_ref[...] = jax.lax.fori_loop(0, kb, body, jnp.zeros((bm, kb), jnp.float32))

  q, s = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((m, kp), jnp.float8_e4m3fn),
                 jax.ShapeDtypeStruct((m, kb), jnp.float32)),
      grid=(cdiv(m, bm),),
      in_specs=[pl.BlockSpec((bm, kp), lambda i: (i, 0))],
      out_specs=(pl.BlockSpec((bm, kp), lambda i: (i, 0)),
                 pl.BlockSpec((bm, kb), lambda i: (i, 0))),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=interpret,
      name="dsv3_fp8_quantize",
      cost_estimate=estimate(4 * m * kp, reads=[x],
                             writes=[jax.ShapeDtypeStruct((m, kp), jnp.float8_e4m3fn),
                                     jax.ShapeDtypeStruct((m, kb), jnp.float32)]),
  )(x)
  return (q[:, :k] if kp != k else q), s


def _matmul_kernel(*refs, k, bk, nk, has_a_scale):
  if has_a_scale:
    a_ref, as_ref, b_ref, bs_ref, o_ref, acc_ref, w_ref, x_ref = refs
  else:
    a_ref, b_ref, bs_ref, o_ref, acc_ref, w_ref = refs
  kk = pl.program_id(2)

  @pl.when(kk == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  k_limit = (k - kk * bk) if k % bk else None
  dequantize_tile(b_ref, bs_ref, w_ref, k_limit=k_limit)
  if has_a_scale:  # activations are dequantised to bf16 as well (the MXU takes no e4m3fn)
    dequantize_rows(a_ref, as_ref, x_ref, k_limit=k_limit)
    x = x_ref[...]
  else:
    x = a_ref[...] if k_limit is None else mask_columns(a_ref[...], k_limit)
  acc_ref[...] += mxu_dot(x, w_ref[...], _NT)

  @pl.when(kk == nk - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("out_dtype", "tiles", "interpret"))
def fp8_matmul(a: jax.Array, a_scale: jax.Array | None, b: jax.Array, b_scale: jax.Array, *,
               out_dtype=jnp.bfloat16, tiles: tuple[int, int, int] | None = None,
               interpret: bool = False) -> jax.Array:
  """a [M, K] . dequant(b [N, K])^T -> [M, N], b e4m3 with b_scale [ceil(N/128), ceil(K/128)].

  a is bf16/f32 (a_scale None: the weight-only path a TPU model uses) or e4m3 with a_scale
  [M, ceil(K/128)] (dequantised to bf16 in VMEM too). tiles = (bm, bk, bn); bk and bn must be
  multiples of 128, bm of 8 (each is cut to the whole dim when that is smaller).
  """
  m, k = a.shape
  n = b.shape[0]
  tm, tk, tn = tiles or (512, 512, 512)
  if tk % BLOCK or tn % BLOCK or tm % 8:
    raise ValueError(f"TPU tiles (bm, bk, bn) must be multiples of (8, 128, 128), got {tiles}")
  bm, bk, bn = tile_size(m, tm), tile_size(k, tk), tile_size(n, tn)
  p, q = cdiv(bn, BLOCK), cdiv(bk, BLOCK)
  nk = cdiv(k, bk)
  has_a_scale = a_scale is not None
  compute_dtype = jnp.float32 if a.dtype == jnp.float32 else jnp.bfloat16

  in_specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk))]
  operands = [a]
  scratch = [pltpu.VMEM((bm, bn), jnp.float32), pltpu.VMEM((bn, bk), compute_dtype)]
  if has_a_scale:
    operands.append(group_row_scales(a_scale, bk))
    in_specs.append(pl.BlockSpec((None, bm, q), lambda i, j, kk: (kk, i, 0)))
    scratch.append(pltpu.VMEM((bm, bk), compute_dtype))
  operands += [b, group_weight_scales(b_scale, bn, bk)]
  in_specs += [pl.BlockSpec((bn, bk), lambda i, j, kk: (j, kk)),
               pl.BlockSpec((None, None, p, q), lambda i, j, kk: (j, kk, 0, 0))]

  kernel = functools.partial(_matmul_kernel, k=k, bk=bk, nk=nk, has_a_scale=has_a_scale)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(cdiv(m, bm), cdiv(n, bn), nk),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="dsv3_fp8_matmul",
      cost_estimate=estimate(2 * m * n * k, reads=operands,
                             writes=[jax.ShapeDtypeStruct((m, n), out_dtype)]),
  )(*operands)
