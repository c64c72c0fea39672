"""MLA attention (training/prefill) in plain jnp: the oracle for the kernels and their fallback.

Einsum letters: b batch, t query position, s key position, k kv head, g query head within its
kv-head group (query head h = k * G + g), d q/k head dim, e v head dim.

Masking rules shared by every implementation (the kernels reproduce them exactly):
- causal: key s is visible from query t when s <= q_offset[b] + t;
- segment ids: key s is visible from query t only when q_seg[b, t] == kv_seg[b, s];
- a query row that sees no key at all outputs zeros (and gets zero gradients).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["mla_attention_reference", "attention_mask", "check_inputs", "normalize_q_offset",
           "kv_block_range", "q_block_range", "round_up", "pad_to", "KernelConfig", "may_mask",
           "MASK_VALUE", "NN", "NT", "padded_call", "kernel_vjp"]

# Shared by the TPU and GPU kernels.
MASK_VALUE = -1e30  # finite: keeps exp(MASK - MASK) defined for rows that are masked so far
NN = (((1,), (0,)), ((), ()))  # dot_general dims of a @ b
NT = (((1,), (1,)), ((), ()))  # dot_general dims of a @ b.T


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static settings of one kernel call (hashable: it parametrises the custom_vjp)."""

  scale: float
  causal: bool
  has_segments: bool
  blocks: Any  # the kernel's own BlockSizes
  interpret: bool
  kv_len: int  # unpadded key length


def may_mask(cfg: KernelConfig, bk: int) -> bool:
  """Whether any (., bk) tile can need a mask (else no masked code is emitted)."""
  return cfg.causal or cfg.has_segments or cfg.kv_len % bk != 0


def check_inputs(q, k, v, segment_ids) -> None:
  """Raises ValueError unless the shapes follow the documented layout."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"expected 4-d q, k, v; got {q.shape}, {k.shape}, {v.shape}")
  b, _, h, dqk = q.shape
  if k.shape[0] != b or v.shape[0] != b or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
    raise ValueError(f"inconsistent q {q.shape}, k {k.shape}, v {v.shape}")
  if k.shape[3] != dqk:
    raise ValueError(f"q and k head dims differ: {q.shape} vs {k.shape}")
  if h % k.shape[2]:
    raise ValueError(f"kv heads ({k.shape[2]}) must divide query heads ({h})")
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids
    if q_seg.shape != q.shape[:2] or kv_seg.shape != k.shape[:2]:
      raise ValueError(f"segment ids must be [batch, q_len] and [batch, kv_len]; got "
                       f"{q_seg.shape}, {kv_seg.shape}")


def normalize_q_offset(q_offset, batch: int) -> jax.Array:
  """int or [batch] int array -> int32 [batch]."""
  off = jnp.asarray(q_offset, jnp.int32)
  if off.ndim == 0:
    return jnp.full((batch,), off, jnp.int32)
  if off.shape != (batch,):
    raise ValueError(f"q_offset must be a scalar or shape ({batch},); got {off.shape}")
  return off


def attention_mask(q_len: int, kv_len: int, *, causal: bool, q_offset, segment_ids):
  """Boolean visibility [b, t, s] (or [1, t, s] without per-batch inputs); True = visible."""
  mask = jnp.ones((1, q_len, kv_len), bool)
  if causal:
    off = jnp.asarray(q_offset, jnp.int32).reshape(-1)  # [b] or [1]
    q_pos = off[:, None] + jnp.arange(q_len, dtype=jnp.int32)[None, :]  # [b, t]
    mask = mask & (jnp.arange(kv_len, dtype=jnp.int32)[None, None, :] <= q_pos[:, :, None])
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids
    mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
  return mask


def mla_attention_reference(q, k, v, *, scale: float, causal: bool = True, segment_ids=None,
                            q_offset=0):
  """Softmax attention with float32 scores and statistics.

  Args:
    q: [batch, q_len, heads, dqk] (bf16 or fp32).
    k: [batch, kv_len, heads_kv, dqk]; heads_kv divides heads (query head h reads kv head
      h // (heads // heads_kv)).
    v: [batch, kv_len, heads_kv, dv].
    scale: multiplier of q.k.
    causal: key s visible from query t iff s <= q_offset + t.
    segment_ids: optional (q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len]) ints.
    q_offset: int or int [batch]: absolute position of query row 0 relative to key row 0.

  Returns:
    [batch, q_len, heads, dv] in q.dtype; rows with no visible key are zero.
  """
  check_inputs(q, k, v, segment_ids)
  b, t, h, _ = q.shape
  s_len, kh = k.shape[1], k.shape[2]
  g = h // kh
  qf = q.astype(jnp.float32).reshape(b, t, kh, g, q.shape[-1])
  scores = jnp.einsum("btkgd,bskd->bkgts", qf, k.astype(jnp.float32)) * scale
  mask = attention_mask(t, s_len, causal=causal, q_offset=normalize_q_offset(q_offset, b),
                        segment_ids=segment_ids)[:, None, None]  # [b, 1, 1, t, s]
  scores = jnp.where(mask, scores, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(scores - m)  # exactly 0 where masked
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0.0, 1.0, l)
  out = jnp.einsum("bkgts,bske->btkge", p, v.astype(jnp.float32))
  return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype)



# Block-level visibility, shared by the TPU and GPU kernels. All arguments may be traced int32
# scalars (program ids, prefetched offsets); block sizes and lengths are static.


def kv_block_range(q_start, *, block_q: int, block_k: int, num_k_blocks: int, kv_len: int,
                   causal: bool, has_segments: bool):
  """Key blocks seen by the query block whose row 0 sits at absolute position `q_start`.

  Returns (n_full, n_end): blocks [0, n_full) are fully visible (no mask needed), blocks
  [n_full, n_end) are partly visible (masked), blocks [n_end, num_k_blocks) are invisible.
  """
  nk = jnp.int32(num_k_blocks)
  if causal:
    n_end = jnp.clip(jax.lax.div(jnp.maximum(q_start + block_q - 1 + block_k, 0), block_k), 0, nk)
    n_full = jnp.clip(jax.lax.div(jnp.maximum(q_start + 1, 0), block_k), 0, n_end)
  else:
    n_end = n_full = nk
  if kv_len % block_k:  # the last key block holds padding
    n_full = jnp.minimum(n_full, kv_len // block_k)
  if has_segments:
    n_full = jnp.int32(0)
  return n_full, n_end


def q_block_range(k_start, q_offset, *, block_q: int, block_k: int, num_q_blocks: int,
                  kv_len: int, causal: bool, has_segments: bool):
  """Query blocks that see the key block starting at `k_start` (for the dk/dv pass).

  Returns (q_lo, q_full): blocks [0, q_lo) see none of it, [q_lo, q_full) see part of it
  (masked), [q_full, num_q_blocks) see all of it.
  """
  nq = jnp.int32(num_q_blocks)
  if causal:
    rel = k_start - q_offset
    q_lo = jnp.clip(jax.lax.div(jnp.maximum(rel, 0), block_q), 0, nq)
    q_full = jnp.clip(jax.lax.div(jnp.maximum(rel + block_k - 1, 0) + block_q - 1, block_q),
                      q_lo, nq)
  else:
    q_lo = q_full = jnp.int32(0)
  if kv_len % block_k:
    q_full = jnp.where(k_start + block_k > kv_len, nq, q_full)
  if has_segments:
    q_full = nq
  return q_lo, q_full


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def pad_to(x, axis: int, size: int, value=0):
  """Pads `x` with `value` along `axis` up to `size` (no-op when already that size)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def padded_call(attention_fn, q, k, v, q_offset, segment_ids, cfg: KernelConfig, tq: int, tk: int,
                *, seq_axis: int = 1):
  """Pads q (and q segment ids) to tq rows and k, v (and kv segment ids) to tk rows, runs
  `attention_fn(q, k, v, q_offset, q_seg, kv_seg, cfg)` and returns its output cut back to the
  query length. `seq_axis`: the sequence axis of q/k/v as `attention_fn` takes them (1 for
  [b, t, h, d], 2 for head-major [b, h, t, d]); segment ids are [b, t] either way."""
  q_seg = kv_seg = None
  if segment_ids is not None:
    q_seg = pad_to(segment_ids[0].astype(jnp.int32), 1, tq)
    kv_seg = pad_to(segment_ids[1].astype(jnp.int32), 1, tk)
  sq = q.shape[seq_axis]
  o = attention_fn(pad_to(q, seq_axis, tq), pad_to(k, seq_axis, tk), pad_to(v, seq_axis, tk),
                   q_offset, q_seg, kv_seg, cfg)
  return lax.slice_in_dim(o, 0, sq, axis=seq_axis)


def kernel_vjp(forward, backward):
  """The differentiable call `f(q, k, v, off, q_seg, kv_seg, cfg)` of a forward/backward kernel
  pair on padded inputs (cfg static):

  forward(q, k, v, off, q_seg, kv_seg, cfg, save_lse) -> o, or (o, lse) when save_lse;
  backward(q, k, v, off, q_seg, kv_seg, o, lse, do, cfg) -> (dq, dk, dv).
  The residuals are the inputs, o and lse; offsets and segment ids get no gradient.
  """
  @functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
  def attention(q, k, v, off, q_seg, kv_seg, cfg):
    return forward(q, k, v, off, q_seg, kv_seg, cfg, save_lse=False)

  def fwd(q, k, v, off, q_seg, kv_seg, cfg):
    o, lse = forward(q, k, v, off, q_seg, kv_seg, cfg, save_lse=True)
    return o, (q, k, v, off, q_seg, kv_seg, o, lse)

  def bwd(cfg, res, do):
    q, k, v, off, q_seg, kv_seg, o, lse = res
    return (*backward(q, k, v, off, q_seg, kv_seg, o, lse, do, cfg), None, None, None)

  attention.defvjp(fwd, bwd)
  return attention
