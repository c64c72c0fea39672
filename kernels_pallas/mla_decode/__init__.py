"""Absorbed-MLA decode: one (or T consecutive) query tokens per sequence against the shared
576-dim latent cache.

`mla_decode` dispatches (see `dsv3_jax.kernels_pallas.backend`) to the jnp reference, the TPU
Pallas kernel (`tpu.py`, Mosaic) or a GPU Pallas kernel (`gpu.py`, Triton lowering, or
`mosaic_gpu.py`, Mosaic GPU for Hopper; `gpu_impl` picks).
"""
from __future__ import annotations

import jax

from dsv3_jax.kernels_pallas.backend import Backend, KernelRequestError, gpu_flavor, select
from dsv3_jax.kernels_pallas.mla_decode.reference import check_inputs, mla_decode_reference

__all__ = ["mla_decode", "mla_decode_reference"]


def mla_decode(q: jax.Array, cache: jax.Array, lengths: jax.Array, *, scale: float,
               kv_lora_rank: int = 512, block_tables: jax.Array | None = None,
               backend: Backend | str = "auto", platform: str | None = None,
               block_sizes=None, gpu_impl: str | None = None) -> jax.Array:
  """Decode attention of absorbed MLA queries against the latent cache.

  scores[b, h, l] = scale * sum_d q[b, h, d] * cache[b, l, d] over all d (latent then rope),
  softmax over l < lengths[b], out[b, h] = sum_l p[b, h, l] * cache[b, l, :kv_lora_rank].

  Multi-token form (MTP speculative verification): q [batch, T, heads, d] holds T consecutive
  new tokens whose rows are the LAST T of the lengths[b] valid cache rows; token t sees rows
  l < lengths[b] - (T - 1 - t), i.e. (with token t at position p_t = lengths[b] - T + t) rows
  l <= p_t. The kernels fold T into the head (row) dimension, rows = T * heads, with a per-row
  causal length, so each cache block is read from HBM once for all T tokens.

  Args:
    q: [batch, heads, d] or [batch, T, heads, d], d = kv_lora_rank + rope dims (DeepSeek-V3:
      512 + 64 = 576): q_nope already multiplied by W_UK, then q_pe.
    cache: [batch, max_len, d] (latent c after its RMSNorm, then the rotated k_pe), or, with
      `block_tables`, a page pool [num_pages, page_size, d].
    lengths: int32 [batch]: valid cache entries per sequence including all T new tokens, in
      [0, capacity] (values outside are clipped). Rows past a sequence's length are never used,
      whatever they hold; a token whose visible count is <= 0 gets zeros.
    scale: softmax scale.
    kv_lora_rank: latent dims at the front of d; they are also the values.
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
    [batch, heads, kv_lora_rank] (or [batch, T, heads, kv_lora_rank]) in q.dtype (float32
    accumulation and softmax inside, also across split-K partials); zero for sequences of
    length 0.
  """
  check_inputs(q, cache, lengths, kv_lora_rank, block_tables)
  if q.ndim == 4 and q.shape[1] == 1:  # one token: the 3-d path
    return mla_decode(q[:, 0], cache, lengths, scale=scale, kv_lora_rank=kv_lora_rank,
                      block_tables=block_tables, backend=backend, platform=platform,
                      block_sizes=block_sizes, gpu_impl=gpu_impl)[:, None]
  impl = select(backend, platform=platform)
  if impl.kind == "reference":
    return mla_decode_reference(q, cache, lengths, scale=scale, kv_lora_rank=kv_lora_rank,
                                block_tables=block_tables)
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
      reason = mosaic_gpu.unsupported_reason(q, cache, kv_lora_rank, block_tables, block_sizes)
      if reason is None:
        return mosaic_gpu.mla_decode(q, cache, lengths, block_tables, scale=scale,
                                     kv_lora_rank=kv_lora_rank, block_sizes=block_sizes,
                                     interpret=impl.interpret)
      if gpu_impl == "mosaic" or block_sizes is not None:
        raise KernelRequestError(f"gpu_impl='mosaic' / mosaic_gpu.BlockSizes cannot take these "
                                 f"inputs: {reason} (use gpu_impl='triton' or 'auto')")
      # auto: Triton for the inputs Mosaic GPU does not take
  if block_sizes is not None and not isinstance(block_sizes, kernel.BlockSizes):
    raise TypeError(f"block_sizes for the {impl.kind} kernel must be {kernel.__name__}.BlockSizes, "
                    f"got {type(block_sizes).__name__}")
  return kernel.mla_decode(q, cache, lengths, block_tables, scale=scale,
                           kv_lora_rank=kv_lora_rank, block_sizes=block_sizes,
                           interpret=impl.interpret)
