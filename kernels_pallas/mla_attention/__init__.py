"""MLA attention for training and prefill: causal flash attention with dqk != dv, fwd + bwd.

`mla_attention` dispatches (see `dsv3_jax.kernels_pallas.backend`) to the jnp reference, the TPU
Pallas kernel (`tpu.py`, Mosaic) or the GPU Pallas kernel (`gpu.py`, Triton lowering). The kernel
paths are `jax.custom_vjp` functions whose backward is also Pallas, so `jax.grad` works.
"""
from __future__ import annotations

import jax

from dsv3_jax.kernels_pallas.backend import Backend, gpu_flavor, select
from dsv3_jax.kernels_pallas.mla_attention.reference import (check_inputs,
                                                             mla_attention_reference,
                                                             normalize_q_offset)

__all__ = ["mla_attention", "mla_attention_reference"]


def mla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, causal: bool = True,
                  segment_ids: tuple[jax.Array, jax.Array] | None = None, q_offset=0,
                  backend: Backend | str = "auto", platform: str | None = None,
                  block_sizes=None, gpu_impl: str | None = None) -> jax.Array:
  """Softmax attention, float32 statistics, GQA/MQA-agnostic, differentiable.

  Args:
    q: [batch, q_len, heads, dqk], bf16 or fp32 (DeepSeek-V3: dqk = 192 = 128 nope + 64 rope).
    k: [batch, kv_len, heads_kv, dqk]; heads_kv divides heads; query head h reads kv head
      h // (heads // heads_kv).
    v: [batch, kv_len, heads_kv, dv] (DeepSeek-V3: dv = 128). The Pallas kernels need dqk and dv
      to be multiples of 64; any q_len / kv_len works (padded internally).
    scale: multiplier of q.k (the softmax scale).
    causal: key s is visible from query t iff s <= q_offset + t.
    segment_ids: optional (q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len]) int32;
      tokens attend only within their own segment (packed sequences).
    q_offset: int or int32 [batch]: absolute position of query row 0 relative to key row 0
      (chunked prefill: kv_len - q_len when the queries are the last q_len keys).
    backend: "auto" | "reference" | "pallas" | "interpret" (see `Backend`).
    platform: "tpu" | "gpu": the kernel to interpret (backend="interpret") or to lower for
      (backend="pallas"/"auto" off-device, e.g. in lowering tests).
    block_sizes: `tpu.BlockSizes` / `gpu.BlockSizes` / `mosaic_gpu.BlockSizes` for the selected
      kernel (default: tuned defaults of that kernel); a `gpu.BlockSizes` given to the Mosaic GPU
      path selects the Triton backward with those tiles.
    gpu_impl: GPU only: "triton", "mosaic" (Mosaic GPU forward + Mosaic GPU backward, see
      `mosaic_gpu.BlockSizes.backward_impl`) or None/"auto"
      (`backend.gpu_flavor`: Mosaic GPU on Hopper). "auto" falls back to Triton for inputs the
      Mosaic GPU kernel cannot take (fp32, see `mosaic_gpu.unsupported_reason`); an explicit
      "mosaic" raises for them instead.

  Returns:
    [batch, q_len, heads, dv] in q.dtype. Rows that see no key at all are zero.
  """
  check_inputs(q, k, v, segment_ids)
  impl = select(backend, platform=platform)
  if impl.kind == "reference":
    return mla_attention_reference(q, k, v, scale=scale, causal=causal, segment_ids=segment_ids,
                                   q_offset=q_offset)
  if q.shape[-1] % 64 or v.shape[-1] % 64:
    raise ValueError(f"the Pallas kernels need head dims that are multiples of 64; got "
                     f"dqk={q.shape[-1]}, dv={v.shape[-1]} (use backend='reference')")
  off = normalize_q_offset(q_offset, q.shape[0])
  if impl.kind == "tpu":
    from dsv3_jax.kernels_pallas.mla_attention import tpu as kernel
  else:
    from dsv3_jax.kernels_pallas.mla_attention import gpu as kernel
    if gpu_flavor(gpu_impl) == "mosaic":
      from dsv3_jax.kernels_pallas.mla_attention import mosaic_gpu
      if isinstance(block_sizes, kernel.BlockSizes):
        block_sizes = mosaic_gpu.BlockSizes(backward=block_sizes, backward_impl="triton")
      reason = mosaic_gpu.unsupported_reason(
          q, k, v, scale=scale, blocks=block_sizes or mosaic_gpu.BlockSizes(),
          has_segments=segment_ids is not None)
      if reason is None:
        kernel = mosaic_gpu
      elif gpu_impl == "mosaic":
        raise ValueError(f"gpu_impl='mosaic' cannot take these inputs: {reason}")
      elif isinstance(block_sizes, mosaic_gpu.BlockSizes):
        # Fallback (e.g. fp32 inputs): the Triton kernel, keeping the requested backward tiles.
        block_sizes = block_sizes.backward
  if block_sizes is not None and not isinstance(block_sizes, kernel.BlockSizes):
    raise TypeError(f"block_sizes for the {impl.kind} kernel must be {kernel.__name__}.BlockSizes, "
                    f"got {type(block_sizes).__name__}")
  return kernel.mla_attention(q, k, v, off, segment_ids, scale=scale, causal=causal,
                              block_sizes=block_sizes, interpret=impl.interpret)
