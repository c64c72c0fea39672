"""Pure-jnp references for grouped (ragged) matmul, built on `jax.lax.ragged_dot`.

Letters: T rows (tokens sorted by expert), G groups (experts), K contraction, N output.
lhs [T, K]; group g owns rows [sum(sizes[:g]), sum(sizes[:g+1])); rows past sum(sizes) give 0.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.kernels_pallas.fp8.reference import dequantize_ref

__all__ = ["grouped_matmul_ref", "transposed_grouped_matmul_ref", "grouped_matmul_fp8_ref",
           "at_layer"]


def at_layer(stack: jax.Array, layer) -> jax.Array:
  """stack[layer] for a stacked [L, ...] operand (layer an int, may be traced; clipped to
  [0, L) as the kernels clip it); `stack` itself when layer is None."""
  if layer is None:
    return stack
  layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, stack.shape[0] - 1)
  return jax.lax.dynamic_index_in_dim(stack, layer, 0, keepdims=False)


def grouped_matmul_ref(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                       out_dtype=None, layer=None) -> jax.Array:
  """lhs [T, K] . rhs[g] [K, N] per group -> [T, N] (out_dtype, default lhs.dtype).

  With `layer`, rhs is a stack [L, G, K, N] and rhs[layer] is used."""
  rhs = at_layer(rhs, layer)
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32),
                           precision=jax.lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)
  return out.astype(out_dtype or lhs.dtype)


def transposed_grouped_matmul_ref(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *,
                                  out_dtype=None) -> jax.Array:
  """out[g] = lhs_g^T [K, T_g] . dout_g [T_g, N] -> [G, K, N]; empty groups give zeros."""
  g, k, n = group_sizes.shape[0], lhs.shape[1], dout.shape[1]

  def fwd(w):
    return jax.lax.ragged_dot(lhs.astype(jnp.float32), w, group_sizes.astype(jnp.int32),
                              precision=jax.lax.Precision.HIGHEST)

  # The rhs-cotangent of ragged_dot is exactly this product (XLA's ragged_dot_general form).
  _, vjp = jax.vjp(fwd, jnp.zeros((g, k, n), jnp.float32))
  (out,) = vjp(dout.astype(jnp.float32))
  return out.astype(out_dtype or lhs.dtype)


def grouped_matmul_fp8_ref(lhs: jax.Array, rhs: jax.Array, rhs_scale: jax.Array,
                           group_sizes: jax.Array, *, lhs_scale: jax.Array | None = None,
                           out_dtype=jnp.bfloat16, layer=None) -> jax.Array:
  """lhs [T, K] . dequant(rhs[g] [N, K], rhs_scale[g])^T per group -> [T, N] out_dtype.

  rhs: [G, N, K] float8_e4m3fn (per-expert [out, in] weights); rhs_scale: [G, ceil(N/128),
  ceil(K/128)] float32 (with `layer`: stacks [L, G, ...] of both, used at rhs[layer]).
  lhs: bf16/f32, or e4m3 with lhs_scale [T, ceil(K/128)].
  """
  rhs, rhs_scale = at_layer(rhs, layer), at_layer(rhs_scale, layer)
  x = lhs.astype(jnp.float32) if lhs_scale is None else dequantize_ref(lhs, lhs_scale,
                                                                        block_rows=1)
  w = jnp.swapaxes(dequantize_ref(rhs, rhs_scale), 1, 2)  # [G, K, N]
  out = jax.lax.ragged_dot(x, w, group_sizes.astype(jnp.int32),
                           precision=jax.lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)
  return out.astype(out_dtype)
