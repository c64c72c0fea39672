"""FP8 (e4m3) block-scaled quantisation and matmul, DeepSeek-V3 layout.

  activations  [M, K] float8_e4m3fn + scales [M, ceil(K/128)] float32         (1 x 128 tiles)
  weights      [N, K] float8_e4m3fn + scales [ceil(N/128), ceil(K/128)] f32   (128 x 128 blocks,
               the checkpoint's `weight` / `weight_scale_inv` in its [out, in] layout)

Backends (see `dsv3_jax.kernels_pallas.backend`): GPU runs FP8 x FP8 on the tensor cores with a
per-128-K scale promotion into a float32 accumulator; TPU (no e4m3fn MXU on v5e/v6e) decodes
weight tiles in VMEM and multiplies in bf16, so a TPU model calls `fp8_weight_matmul` with bf16
activations. The references in `reference.py` define the numerics.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.kernels_pallas.backend import Backend, KernelRequestError, gpu_flavor, select
from dsv3_jax.kernels_pallas.fp8 import gpu, mosaic_gpu, reference, tpu
from dsv3_jax.kernels_pallas.fp8.reference import (AMAX_FLOOR, BLOCK, E4M3_MAX, cdiv,
                                                   dequantize_ref)

__all__ = ["BLOCK", "E4M3_MAX", "AMAX_FLOOR", "quantize_activations", "fp8_matmul",
           "fp8_weight_matmul", "dequantize"]

_FP8 = jnp.float8_e4m3fn


def dequantize(w: jax.Array, scale: jax.Array, *, block_rows: int = BLOCK,
               block_cols: int = BLOCK) -> jax.Array:
  """w [..., R, C] e4m3 with scale [..., ceil(R/block_rows), ceil(C/block_cols)] -> float32."""
  return dequantize_ref(w, scale, block_rows=block_rows, block_cols=block_cols)


def quantize_activations(x: jax.Array, *, block: int = BLOCK, power_of_two_scale: bool = False,
                         backend: Backend | str = "auto",
                         platform: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Quantises activations per 1 x `block` tile in one fused kernel (amax, scale, cast).

  Args:
    x: [M, K] bfloat16 or float32.
    block: tile width (128 in DeepSeek-V3; the GPU kernel needs a power of two, the TPU kernel
      a multiple of 128).
    power_of_two_scale: round each scale up to a power of two (ue8m0, DeepSeek-V3.1).
    backend, platform: see `dsv3_jax.kernels_pallas.backend.select`.

  Returns:
    (values [M, K] float8_e4m3fn, scales [M, ceil(K/block)] float32), such that
    values * scales (broadcast per tile) ~= x. scale = max(amax, AMAX_FLOOR) * float32(1/448),
    so an all-zero tile has scale AMAX_FLOOR/448 and zero values; with power_of_two_scale the
    scale is the next power of two up. values = clip(x / scale, +-448) rounded to nearest even.
    Every backend equals `reference.quantize_activations_ref` bitwise in interpret mode. On GPU
    hardware Triton's float32 division is not correctly rounded (div.full.f32), so without
    power_of_two_scale a value whose x/scale lies within ~2 ulp of an e4m3 rounding midpoint may
    land one e4m3 step away from the XLA reference; power-of-two scales divide exactly.
  """
  if x.ndim != 2 or x.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"x must be [M, K] bfloat16/float32, got {x.shape} {x.dtype}")
  impl = select(backend, platform=platform)
  if impl.kind == "reference" or x.size == 0:
    return reference.quantize_activations_ref(x, block=block,
                                              power_of_two_scale=power_of_two_scale)
  kernel = tpu.quantize_activations if impl.kind == "tpu" else gpu.quantize_activations
  return kernel(x, block=block, power_of_two_scale=power_of_two_scale, interpret=impl.interpret)


def _check_weight(b: jax.Array, b_scale: jax.Array, k: int) -> None:
  if b.ndim != 2 or b.dtype != _FP8 or b.shape[1] != k:
    raise ValueError(f"b must be [N, K={k}] float8_e4m3fn, got {b.shape} {b.dtype}")
  want = (cdiv(b.shape[0], BLOCK), cdiv(k, BLOCK))
  if b_scale.shape != want:
    raise ValueError(f"b_scale must be {want} (128 x 128 blocks of b {b.shape}), "
                     f"got {b_scale.shape}")


def fp8_matmul(a: jax.Array, a_scale: jax.Array, b: jax.Array, b_scale: jax.Array, *,
               out_dtype=jnp.bfloat16, backend: Backend | str = "auto",
               platform: str | None = None, gpu_impl: str | None = None) -> jax.Array:
  """Block-scaled FP8 matmul: out[m, n] = sum_k (a*a_scale)[m, k] * (b*b_scale)[n, k].

  Args:
    a: [M, K] float8_e4m3fn activations; a_scale: [M, ceil(K/128)] float32 (1 x 128 tiles).
    b: [N, K] float8_e4m3fn weights ([out, in]); b_scale: [ceil(N/128), ceil(K/128)] float32.
      Partial edge blocks are allowed (e.g. N=576, K=7168 with a [5, 56] scale).
    out_dtype: output dtype (bfloat16 by default); accumulation is float32.
    gpu_impl: GPU flavour, "triton" / "mosaic" / None (auto: Mosaic GPU on Hopper; see
      `backend.gpu_flavor`). Under auto, shapes `mosaic_gpu.unsupported_reason` rejects (K not
      a multiple of 256, N not a multiple of 16, M not a multiple of 8) run the Triton kernel;
      gpu_impl="mosaic" raises `KernelRequestError` for them.

  Returns:
    [M, N] out_dtype. The GPU kernel multiplies e4m3 x e4m3 on the tensor cores with a float32
    partial per 128-wide K step (exact products); the TPU kernel dequantises both operands to
    bf16 in VMEM first (relative error ~2^-9 per operand on top of the FP8 rounding).
  """
  if a.ndim != 2 or a.dtype != _FP8:
    raise ValueError(f"a must be [M, K] float8_e4m3fn, got {a.shape} {a.dtype}")
  m, k = a.shape
  if a_scale.shape != (m, cdiv(k, BLOCK)):
    raise ValueError(f"a_scale must be {(m, cdiv(k, BLOCK))}, got {a_scale.shape}")
  _check_weight(b, b_scale, k)
  impl = select(backend, platform=platform)
  if impl.kind == "reference" or 0 in (m, k, b.shape[0]):
    return reference.fp8_matmul_ref(a, a_scale, b, b_scale, out_dtype=out_dtype)
  a_scale = a_scale.astype(jnp.float32)
  b_scale = b_scale.astype(jnp.float32)
  if impl.kind == "tpu":
    return tpu.fp8_matmul(a, a_scale, b, b_scale, out_dtype=out_dtype, interpret=impl.interpret)
  if gpu_flavor(gpu_impl, has_mosaic=True) == "mosaic":
    reason = mosaic_gpu.unsupported_reason(a.dtype, b.dtype, m, b.shape[0], k)
    if reason is None:
      return mosaic_gpu.fp8_matmul(a, a_scale, b, b_scale, out_dtype=out_dtype,
                                   interpret=impl.interpret)
    if gpu_impl == "mosaic":
      raise KernelRequestError(f"fp8_matmul gpu_impl='mosaic' cannot take these inputs: "
                               f"{reason} (use gpu_impl='triton' or 'auto')")
  return gpu.fp8_matmul(a, a_scale, b, b_scale, out_dtype=out_dtype, interpret=impl.interpret)


def fp8_weight_matmul(x: jax.Array, b: jax.Array, b_scale: jax.Array, *,
                      out_dtype=jnp.bfloat16, backend: Backend | str = "auto",
                      platform: str | None = None) -> jax.Array:
  """Weight-only FP8 matmul: x [M, K] bf16/f32 times dequant(b [N, K], b_scale)^T -> [M, N].

  The path a TPU model uses (weights cross HBM as 1 byte per element and are dequantised in
  VMEM, then multiplied in bf16, or f32 for f32 x). On GPU each weight tile is upcast to x's
  dtype exactly and its block scale applied to the float32 partial product.
  """
  if x.ndim != 2 or x.dtype not in (jnp.bfloat16, jnp.float32):
    raise ValueError(f"x must be [M, K] bfloat16/float32, got {x.shape} {x.dtype}")
  m, k = x.shape
  _check_weight(b, b_scale, k)
  impl = select(backend, platform=platform)
  if impl.kind == "reference" or 0 in (m, k, b.shape[0]):
    return reference.fp8_weight_matmul_ref(x, b, b_scale, out_dtype=out_dtype)
  b_scale = b_scale.astype(jnp.float32)
  if impl.kind == "tpu":
    return tpu.fp8_matmul(x, None, b, b_scale, out_dtype=out_dtype, interpret=impl.interpret)
  return gpu.fp8_matmul(x, None, b, b_scale, out_dtype=out_dtype, interpret=impl.interpret)
