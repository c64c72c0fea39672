"""Pure-jnp references for FP8 block-scaled quantisation and matmul (the oracles and fallback).

Layouts (DeepSeek-V3 checkpoint conventions, block = 128):
  activations  a  [M, K] float8_e4m3fn, a_scale [M, ceil(K/128)] float32   (1 x 128 tiles)
  weights      b  [N, K] float8_e4m3fn, b_scale [ceil(N/128), ceil(K/128)] float32
               ([out, in], the checkpoint's `weight` and `weight_scale_inv`; 128 x 128 blocks)
  dequantised value = stored value * scale of its tile; partial edge tiles are allowed.

Quantisation rule (`quantize_activations`), per 1 x 128 tile of x:
  amax  = max |x| over the tile, floored at AMAX_FLOOR (so an all-zero tile gets a tiny finite
          scale and zero values instead of 0/0)
  scale = amax * float32(1/448)      (a multiply, not a divide: bitwise reproducible on every
                                      backend; it differs from amax/448 by at most one ulp)
  if power_of_two_scale: scale = 2**ceil(log2(scale)), computed on the float32 bits (ue8m0, the
          DeepSeek-V3.1 style)
  value = clip(x / scale, -448, 448) cast to float8_e4m3fn (round to nearest even)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BLOCK", "E4M3_MAX", "AMAX_FLOOR", "quantize_activations_ref", "dequantize_ref",
    "fp8_matmul_ref", "fp8_weight_matmul_ref", "tile_scales", "pow2_round_up",
]

BLOCK = 128
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-10
INV_E4M3_MAX = float(np.float32(1.0) / np.float32(E4M3_MAX))


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def pow2_round_up(s: jax.Array) -> jax.Array:
  """Smallest power of two >= s for positive normal float32 s, exact (integer ops on the bits)."""
  bits = jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.int32)
  bits = (bits + 0x7FFFFF) & 0x7F800000  # a non-zero mantissa carries into the exponent
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def tile_scales(amax: jax.Array, power_of_two_scale: bool) -> jax.Array:
  """float32 scales from per-tile amax (any shape), following the module's quantisation rule."""
  s = jnp.maximum(amax.astype(jnp.float32), AMAX_FLOOR) * jnp.float32(INV_E4M3_MAX)
  return pow2_round_up(s) if power_of_two_scale else s


def quantize_activations_ref(x: jax.Array, *, block: int = BLOCK,
                             power_of_two_scale: bool = False) -> tuple[jax.Array, jax.Array]:
  """x [M, K] bf16/f32 -> (values [M, K] float8_e4m3fn, scales [M, ceil(K/block)] float32)."""
  m, k = x.shape
  kb = cdiv(k, block)
  xf = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, kb * block - k)))
  xt = xf.reshape(m, kb, block)
  scale = tile_scales(jnp.max(jnp.abs(xt), axis=-1), power_of_two_scale)
  q = jnp.clip(xt / scale[..., None], -E4M3_MAX, E4M3_MAX).astype(jnp.float8_e4m3fn)
  return q.reshape(m, kb * block)[:, :k], scale


def dequantize_ref(w: jax.Array, scale: jax.Array, *, block_rows: int = BLOCK,
                   block_cols: int = BLOCK) -> jax.Array:
  """w [..., R, C] (fp8) with scale [..., ceil(R/block_rows), ceil(C/block_cols)] -> float32.

  Activations use block_rows=1 (scale [M, ceil(K/128)]); weights use 128 x 128.
  """
  r, c = w.shape[-2:]
  s = jnp.repeat(jnp.repeat(scale.astype(jnp.float32), block_rows, axis=-2), block_cols, axis=-1)
  return w.astype(jnp.float32) * s[..., :r, :c]


def fp8_matmul_ref(a: jax.Array, a_scale: jax.Array, b: jax.Array, b_scale: jax.Array, *,
                   out_dtype=jnp.bfloat16) -> jax.Array:
  """sum_k (a*a_scale)[m,k] (b*b_scale)[n,k] in float32 -> [M, N] out_dtype."""
  a32 = dequantize_ref(a, a_scale, block_rows=1)
  b32 = dequantize_ref(b, b_scale)
  out = jax.lax.dot_general(a32, b32, (((1,), (1,)), ((), ())),
                            precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
  return out.astype(out_dtype)


def fp8_weight_matmul_ref(x: jax.Array, b: jax.Array, b_scale: jax.Array, *,
                          out_dtype=jnp.bfloat16) -> jax.Array:
  """x [M, K] bf16/f32 times dequantised b [N, K]^T, float32 accumulation -> [M, N] out_dtype."""
  b32 = dequantize_ref(b, b_scale)
  out = jax.lax.dot_general(x.astype(jnp.float32), b32, (((1,), (1,)), ((), ())),
                            precision=jax.lax.Precision.HIGHEST,
                            preferred_element_type=jnp.float32)
  return out.astype(out_dtype)
