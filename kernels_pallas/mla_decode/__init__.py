"""Absorbed-MLA decode: one (or T consecutive) query tokens per sequence against the shared
latent cache (DeepSeek-V3: 512 latent + 64 rope values per token).

Cache layout (one for every backend): two lane-aligned parts,
  latent [(L,) B, S, C]  the normalised c_kv, rows minor-to-major as written (C = 512 lanes);
  rope   [(L,) B, R, S]  the rotated shared k_pe, TRANSPOSED (positions minor).
A fused [B, S, C + R] row (576 values) is not a multiple of 128 lanes: XLA:TPU then stores the
cache with positions minor and copies all of it to row-major around every kernel call. [B, S, R]
alone has the same problem (64 lanes); [B, R, S] is row-major as XLA:TPU lays it out, and
q_pe . rope is a plain (heads, R) x (R, block) matmul in the kernels. With a leading layers axis
and `layer`, the kernels index the layer in their block index maps, so a scanned decoder passes
its whole stacked cache and no per-layer slice is materialised.

`write_rope` writes new tokens' rope keys into the transposed part: a scatter everywhere except
with the TPU kernel, where XLA would otherwise re-lay the whole stack out (`tpu_write.py`).

`mla_decode` dispatches (see `dsv3_jax.kernels_pallas.backend`) to the jnp reference, the TPU
Pallas kernel (`tpu.py`, Mosaic) or a GPU Pallas kernel (`gpu.py`, Triton lowering, or
`mosaic_gpu.py`, Mosaic GPU for Hopper; `gpu_impl` picks).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.kernels_pallas.backend import Backend, KernelRequestError, gpu_flavor, select
from dsv3_jax.kernels_pallas.mla_decode.reference import (check_inputs, mla_decode_reference,
                                                          split_cache)

__all__ = ["mla_decode", "mla_decode_reference", "split_cache", "write_rope"]


def mla_decode(q: jax.Array, latent: jax.Array, rope: jax.Array, lengths: jax.Array, *,
               scale: float, layer=None, block_tables: jax.Array | None = None,
               backend: Backend | str = "auto", platform: str | None = None,
               block_sizes=None, gpu_impl: str | None = None) -> jax.Array:
  """Decode attention of absorbed MLA queries against the latent cache.

  scores[b, h, l] = scale * (q[b, h, :C] . latent[b, l] + q[b, h, C:] . rope[b, :, l]),
  softmax over l < lengths[b], out[b, h] = sum_l p[b, h, l] * latent[b, l].

  Multi-token form (MTP speculative verification): q [batch, T, heads, d] holds T consecutive
  new tokens whose rows are the LAST T of the lengths[b] valid cache rows; token t sees rows
  l < lengths[b] - (T - 1 - t), i.e. (with token t at position p_t = lengths[b] - T + t) rows
  l <= p_t. The kernels fold T into the head (row) dimension, rows = T * heads, with a per-row
  causal length, so each cache block is read from HBM once for all T tokens.

  Args:
    q: [batch, heads, d] or [batch, T, heads, d], d = C + R (DeepSeek-V3: 512 + 64): q_nope
      already multiplied by W_UK, then q_pe.
    latent: [batch, max_len, C] (latent c after its RMSNorm), or, with `block_tables`, a page
      pool [num_pages, page_size, C]. C is kv_lora_rank; the values are these same rows.
    rope: [batch, R, max_len] (the rotated k_pe, transposed), or a pool [num_pages, R, page_size].
    lengths: int32 [batch]: valid cache entries per sequence including all T new tokens, in
      [0, capacity] (values outside are clipped). Rows past a sequence's length are never used,
      whatever they hold; a token whose visible count is <= 0 gets zeros.
    scale: softmax scale.
    layer: optional int scalar (may be traced): latent and rope then carry a leading layers
      axis ([L, ...] of the shapes above) and the kernels read layer `layer` in place.
    block_tables: optional int32 [batch, pages_per_seq]: logical page i of sequence b lives in
      pool page block_tables[b, i]; entries past a sequence's length are ignored.
    backend: "auto" | "reference" | "pallas" | "interpret" (see `Backend`).
    platform: "tpu" | "gpu": the kernel to interpret, or to lower for off-device.
    block_sizes: `tpu.BlockSizes` / `gpu.BlockSizes` / `mosaic_gpu.BlockSizes` of the selected
      kernel (block_k, and the split-K factor num_splits; None picks one from the batch size and
      capacity). A Triton `gpu.BlockSizes` with gpu_impl=None selects the Triton kernel.
    gpu_impl: GPU flavour, "triton" / "mosaic" / None (auto: Mosaic GPU on Hopper, see
      `backend.gpu_flavor`). Auto runs Triton for inputs Mosaic GPU does not take
      (`mosaic_gpu.unsupported_reason`: heads not a multiple of 64, paged caches with pages
      smaller than its block_k, non-bf16/f16, ...); gpu_impl="mosaic" or a
      `mosaic_gpu.BlockSizes` raises `KernelRequestError` for them instead.

  Returns:
    [batch, heads, C] (or [batch, T, heads, C]) in q.dtype (float32 accumulation and softmax
    inside, also across split-K partials); zero for sequences of length 0.
  """
  check_inputs(q, latent, rope, lengths, block_tables, layer)
  if q.ndim == 4 and q.shape[1] == 1:  # one token: the 3-d path
    return mla_decode(q[:, 0], latent, rope, lengths, scale=scale, layer=layer,
                      block_tables=block_tables, backend=backend, platform=platform,
                      block_sizes=block_sizes, gpu_impl=gpu_impl)[:, None]
  impl = select(backend, platform=platform)
  if impl.kind == "reference":
    return mla_decode_reference(q, latent, rope, lengths, scale=scale, block_tables=block_tables,
                                layer=layer)
  # The kernels always take a layers axis (a free reshape when there is none) and the index.
  if layer is None:
    latent, rope, layer = latent[None], rope[None], 0
  layer = jnp.asarray(layer, jnp.int32).reshape(1)
  if impl.kind == "tpu":
    from dsv3_jax.kernels_pallas.mla_decode import tpu as kernel
  else:
    from dsv3_jax.kernels_pallas.mla_decode import gpu as kernel
    from dsv3_jax.kernels_pallas.mla_decode import mosaic_gpu
    triton_blocks = isinstance(block_sizes, kernel.BlockSizes) and gpu_impl is None
    if not triton_blocks and gpu_flavor(gpu_impl, has_mosaic=True) == "mosaic":
      if block_sizes is not None and not isinstance(block_sizes, mosaic_gpu.BlockSizes):
        raise TypeError(f"block_sizes for the Mosaic GPU kernel must be mosaic_gpu.BlockSizes, "
                        f"got {type(block_sizes).__name__}")
      reason = mosaic_gpu.unsupported_reason(q, latent, rope, block_tables, block_sizes)
      if reason is None:
        return mosaic_gpu.mla_decode(q, latent, rope, lengths, layer, block_tables, scale=scale,
                                     block_sizes=block_sizes, interpret=impl.interpret)
      if gpu_impl == "mosaic" or block_sizes is not None:
        raise KernelRequestError(f"gpu_impl='mosaic' / mosaic_gpu.BlockSizes cannot take these "
                                 f"inputs: {reason} (use gpu_impl='triton' or 'auto')")
      # auto: Triton for the inputs Mosaic GPU does not take
  if block_sizes is not None and not isinstance(block_sizes, kernel.BlockSizes):
    raise TypeError(f"block_sizes for the {impl.kind} kernel must be {kernel.__name__}.BlockSizes, "
                    f"got {type(block_sizes).__name__}")
  return kernel.mla_decode(q, latent, rope, lengths, layer, block_tables, scale=scale,
                           block_sizes=block_sizes, interpret=impl.interpret)


def write_rope(rope: jax.Array, k_pe: jax.Array, positions: jax.Array, *, layer=None,
               backend: Backend | str = "auto", platform: str | None = None) -> jax.Array:
  """Writes T new tokens' rope keys into the transposed rope cache.

  Args:
    rope: [B, R, S], or stacked [L, B, R, S] with `layer` (int scalar, may be traced).
    k_pe: [B, T, R] the new tokens' rotated rope keys.
    positions: int [B, T] their positions (< S), consecutive per sequence
      (positions[b, t] = positions[b, 0] + t: the TPU kernel writes from positions[:, 0]).
    backend, platform: as for `mla_decode`; the TPU kernel (`tpu_write.py`) runs where
      `mla_decode` would run the TPU kernel, a scatter (in place; XLA:GPU and CPU keep the
      row-major layout) everywhere else.

  Returns:
    rope with rope[(layer,) b, :, positions[b, t]] = k_pe[b, t].
  """
  stacked = layer is not None
  if rope.ndim != 3 + stacked or k_pe.ndim != 3 or positions.shape != k_pe.shape[:2] or \
      k_pe.shape[0] != rope.shape[-3] or k_pe.shape[2] != rope.shape[-2]:
    raise ValueError(f"write_rope: expected rope [{'L, ' * stacked}B, R, S], k_pe [B, T, R] and "
                     f"positions [B, T]; got rope {rope.shape}, k_pe {k_pe.shape}, positions "
                     f"{positions.shape}")
  if not stacked:
    return write_rope(rope[None], k_pe, positions, layer=0, backend=backend,
                      platform=platform)[0]
  layer = jnp.asarray(layer, jnp.int32)
  impl = select(backend, platform=platform)
  if impl.kind == "tpu":
    from dsv3_jax.kernels_pallas.mla_decode import tpu_write
    return tpu_write.write_rope(rope, layer.reshape(1), k_pe, positions[:, 0],
                                interpret=impl.interpret)
  B, T = positions.shape
  b = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  # Advanced indices around the slice: the update is [B, T, R].
  return rope.at[layer, b, :, positions].set(k_pe.astype(rope.dtype), unique_indices=True)
