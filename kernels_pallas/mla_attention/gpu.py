"""MLA attention, GPU Pallas (Triton lowering): flash-attention forward and backward, dqk != dv.

Written for the Triton lowering because it also serves ROCm (not exercised here). Tensors stay in
the caller's [batch, seq, heads, dim] layout; each program owns one (query block, head, batch)
(forward, dq) or one (key block, kv head, batch) (dk/dv, which loops over the heads of its
group, so GQA/MQA need no reduction afterwards). Triton needs power-of-two tiles, so head dims
are split into power-of-two column chunks (192 = 128 + 64: the nope and rope parts) and every
q.k product is a sum of per-chunk dots. Softmax runs in base 2 with log2(e) folded into the
scale; the saved log-sum-exp is in base 2 too.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dsv3_jax.kernels_pallas.mla_attention.reference import (MASK_VALUE, NN, NT, KernelConfig,
                                                             kernel_vjp, kv_block_range, may_mask,
                                                             padded_call, q_block_range, round_up)

__all__ = ["BlockSizes", "mla_attention", "pow2_chunks", "backward"]

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles (powers of two, >= 16) and Triton launch parameters."""

  block_q: int = 128
  block_k: int = 64
  num_warps: int = 8
  num_stages: int = 3
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  block_q_dq: int = 64
  block_k_dq: int = 64
  num_warps_bwd: int = 8
  num_stages_bwd: int = 2


def pow2_chunks(width: int) -> tuple[tuple[int, int], ...]:
  """Splits [0, width) into power-of-two (offset, size) column chunks, largest first."""
  chunks, off = [], 0
  for bit in reversed(range(width.bit_length())):
    if width & (1 << bit):
      chunks.append((off, 1 << bit))
      off += 1 << bit
  return tuple(chunks)


def _tile(requested: int, length: int) -> int:
  """Power-of-two tile: min(requested, next pow2 of length), at least 16 (Triton dot minimum)."""
  if requested & (requested - 1) or requested < 16:
    raise ValueError(f"GPU block sizes must be powers of two >= 16; got {requested}")
  return max(16, min(requested, pl.next_power_of_2(length)))


def _load_chunks(ref, rows, chunks, head=None):
  if head is None:
    return [ref[rows, pl.ds(o, n)] for o, n in chunks]
  return [ref[rows, head, pl.ds(o, n)] for o, n in chunks]


def _dot_chunks(xs, ys, dims):
  out = None
  for x, y in zip(xs, ys):
    d = lax.dot_general(x, y, dims, preferred_element_type=jnp.float32)
    out = d if out is None else out + d
  return out


def _mask(q_start, k_start, bq, bk, *, transposed, cfg: KernelConfig, q_seg=None, kv_seg=None):
  """Visibility of a (bq, bk) tile, or of its (bk, bq) transpose."""
  q_pos = q_start + jnp.arange(bq, dtype=jnp.int32)
  k_pos = k_start + jnp.arange(bk, dtype=jnp.int32)
  if transposed:
    q_pos, k_pos = q_pos[None, :], k_pos[:, None]
    seg = (kv_seg[:, None] == q_seg[None, :]) if cfg.has_segments else None
  else:
    q_pos, k_pos = q_pos[:, None], k_pos[None, :]
    seg = (q_seg[:, None] == kv_seg[None, :]) if cfg.has_segments else None
  mask = None
  if cfg.causal:
    mask = k_pos <= q_pos
  if cfg.kv_len % bk:
    pad = k_pos < cfg.kv_len
    mask = pad if mask is None else jnp.logical_and(mask, pad)
  if seg is not None:
    mask = seg if mask is None else jnp.logical_and(mask, seg)
  assert mask is not None, "masked tile without any mask"
  return jnp.broadcast_to(mask, (bk, bq) if transposed else (bq, bk))


# ----------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(off_ref, q_ref, k_ref, v_ref, *refs, cfg: KernelConfig, bq: int, bk: int, nq: int,
                nk: int):
  if cfg.has_segments:
    q_seg_ref, kv_seg_ref, *refs = refs
    q_seg = q_seg_ref[...]
  else:
    q_seg, kv_seg_ref = None, None
  o_ref, *lse_ref = refs
  qk_chunks, v_chunks = pow2_chunks(q_ref.shape[-1]), pow2_chunks(v_ref.shape[-1])
  i = nq - 1 - pl.program_id(0)
  q_start = off_ref[0] + i * bq
  n_full, n_end = kv_block_range(q_start, block_q=bq, block_k=bk, num_k_blocks=nk,
                                 kv_len=cfg.kv_len, causal=cfg.causal,
                                 has_segments=cfg.has_segments)
  qs = _load_chunks(q_ref, slice(None), qk_chunks)
  qk_scale = cfg.scale * LOG2E

  def body(j, carry, masked: bool):
    accs, m, l = carry
    rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
    s = _dot_chunks(qs, _load_chunks(k_ref, rows, qk_chunks), NT) * qk_scale
    if masked:
      kv_seg = kv_seg_ref[rows] if cfg.has_segments else None
      mask = _mask(q_start, j * bk, bq, bk, transposed=False, cfg=cfg, q_seg=q_seg, kv_seg=kv_seg)
      s = jnp.where(mask, s, MASK_VALUE)
    m_next = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_next)
    p = jnp.exp2(s - m_next[:, None])
    if masked:
      p = jnp.where(mask, p, 0.0)  # a row masked so far must not pick up exp2(0) = 1
    l = l * alpha + p.sum(axis=1)
    vs = _load_chunks(v_ref, rows, v_chunks)
    p = p.astype(vs[0].dtype)
    accs = tuple(a * alpha[:, None] + lax.dot_general(p, vc, NN, preferred_element_type=jnp.float32)
                 for a, vc in zip(accs, vs))
    return accs, m_next, l

  carry = (tuple(jnp.zeros((bq, n), jnp.float32) for _, n in v_chunks),
           jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32))
  carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
  if may_mask(cfg, bk):
    carry = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), carry)
  accs, m, l = carry
  inv = jnp.where(l > 0.0, 1.0 / l, 0.0)
  for (o, n), a in zip(v_chunks, accs):
    o_ref[:, pl.ds(o, n)] = (a * inv[:, None]).astype(o_ref.dtype)
  if lse_ref:
    lse_ref[0][...] = jnp.where(l > 0.0, m + jnp.log2(l), jnp.inf)


def _forward(q, k, v, off, q_seg, kv_seg, cfg: KernelConfig, save_lse: bool):
  """Padded [b, t, h, d] inputs -> o [b, t, h, dv] (and base-2 lse [b, h, t])."""
  b, tq, h, dqk = q.shape
  tk, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
  g = h // hk
  bq, bk = _tile(cfg.blocks.block_q, tq), _tile(cfg.blocks.block_k, tk)
  nq, nk = tq // bq, tk // bk
  q_map = lambda i, h_, b_: (b_, nq - 1 - i, h_, 0)  # heaviest causal blocks first
  kv_map = lambda i, h_, b_: (b_, 0, lax.div(h_, g), 0)
  in_specs = [
      pl.BlockSpec((1,), lambda i, h_, b_: (b_,)),
      pl.BlockSpec((None, bq, None, dqk), q_map),
      pl.BlockSpec((None, tk, None, dqk), kv_map),
      pl.BlockSpec((None, tk, None, dv), kv_map),
  ]
  args = [off, q, k, v]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda i, h_, b_: (b_, nq - 1 - i)),
                 pl.BlockSpec((None, tk), lambda i, h_, b_: (b_, 0))]
    args += [q_seg, kv_seg]
  out_specs = [pl.BlockSpec((None, bq, None, dv), q_map)]
  out_shape = [jax.ShapeDtypeStruct((b, tq, h, dv), q.dtype)]
  if save_lse:
    out_specs.append(pl.BlockSpec((None, None, bq), lambda i, h_, b_: (b_, h_, nq - 1 - i)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, tq), jnp.float32))
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bk=bk, nq=nq, nk=nk),
      grid=(nq, h, b),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plt.CompilerParams(num_warps=cfg.blocks.num_warps,
                                         num_stages=cfg.blocks.num_stages),
      interpret=cfg.interpret,
      name="mla_attention_fwd",
  )(*args)
  return tuple(outs) if save_lse else outs[0]


# ----------------------------------------------------------------------------------------------
# Backward.


def _dq_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, cfg: KernelConfig,
               bq: int, bk: int, nq: int, nk: int):
  if cfg.has_segments:
    q_seg_ref, kv_seg_ref, dq_ref = refs
    q_seg = q_seg_ref[...]
  else:
    (dq_ref,), q_seg, kv_seg_ref = refs, None, None
  qk_chunks, v_chunks = pow2_chunks(q_ref.shape[-1]), pow2_chunks(v_ref.shape[-1])
  i = nq - 1 - pl.program_id(0)
  q_start = off_ref[0] + i * bq
  n_full, n_end = kv_block_range(q_start, block_q=bq, block_k=bk, num_k_blocks=nk,
                                 kv_len=cfg.kv_len, causal=cfg.causal,
                                 has_segments=cfg.has_segments)
  qs = _load_chunks(q_ref, slice(None), qk_chunks)
  dos = _load_chunks(do_ref, slice(None), v_chunks)
  lse, di = lse_ref[...], di_ref[...]
  qk_scale = cfg.scale * LOG2E

  def body(j, dqs, masked: bool):
    rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
    ks = _load_chunks(k_ref, rows, qk_chunks)
    s = _dot_chunks(qs, ks, NT) * qk_scale
    if masked:
      kv_seg = kv_seg_ref[rows] if cfg.has_segments else None
      mask = _mask(q_start, j * bk, bq, bk, transposed=False, cfg=cfg, q_seg=q_seg, kv_seg=kv_seg)
      s = jnp.where(mask, s, MASK_VALUE)
    p = jnp.exp2(s - lse[:, None])  # lse = +inf on rows that see nothing
    dp = _dot_chunks(dos, _load_chunks(v_ref, rows, v_chunks), NT)
    ds = (p * (dp - di[:, None])).astype(ks[0].dtype)
    return tuple(a + lax.dot_general(ds, kc, NN, preferred_element_type=jnp.float32)
                 for a, kc in zip(dqs, ks))

  dqs = tuple(jnp.zeros((bq, n), jnp.float32) for _, n in qk_chunks)
  dqs = lax.fori_loop(0, n_full, functools.partial(body, masked=False), dqs)
  if may_mask(cfg, bk):
    dqs = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), dqs)
  for (o, n), a in zip(qk_chunks, dqs):
    dq_ref[:, pl.ds(o, n)] = (a * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, cfg: KernelConfig,
                bq: int, bk: int, nq: int, g: int):
  if cfg.has_segments:
    q_seg_ref, kv_seg_ref, dk_ref, dv_ref = refs
    kv_seg = kv_seg_ref[...]
  else:
    (dk_ref, dv_ref), q_seg_ref, kv_seg = refs, None, None
  qk_chunks, v_chunks = pow2_chunks(q_ref.shape[-1]), pow2_chunks(v_ref.shape[-1])
  kb = pl.program_id(0)
  off = off_ref[0]
  k_start = kb * bk
  q_lo, q_full = q_block_range(k_start, off, block_q=bq, block_k=bk, num_q_blocks=nq,
                               kv_len=cfg.kv_len, causal=cfg.causal,
                               has_segments=cfg.has_segments)
  ks = _load_chunks(k_ref, slice(None), qk_chunks)
  vs = _load_chunks(v_ref, slice(None), v_chunks)
  qk_scale = cfg.scale * LOG2E

  def body(i, carry, head, masked: bool):
    dks, dvs = carry
    rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
    qs = _load_chunks(q_ref, rows, qk_chunks, head)
    dos = _load_chunks(do_ref, rows, v_chunks, head)
    st = _dot_chunks(ks, qs, NT) * qk_scale  # (bk, bq)
    if masked:
      q_seg = q_seg_ref[rows] if cfg.has_segments else None
      mask = _mask(off + i * bq, k_start, bq, bk, transposed=True, cfg=cfg, q_seg=q_seg,
                   kv_seg=kv_seg)
      st = jnp.where(mask, st, MASK_VALUE)
    pt = jnp.exp2(st - lse_ref[head, rows][None, :])
    dvs = tuple(a + lax.dot_general(pt.astype(dc.dtype), dc, NN,
                                    preferred_element_type=jnp.float32)
                for a, dc in zip(dvs, dos))
    dpt = _dot_chunks(vs, dos, NT)
    dst = (pt * (dpt - di_ref[head, rows][None, :])).astype(qs[0].dtype)
    dks = tuple(a + lax.dot_general(dst, qc, NN, preferred_element_type=jnp.float32)
                for a, qc in zip(dks, qs))
    return dks, dvs

  def per_head(head, carry):
    if may_mask(cfg, bk):
      carry = lax.fori_loop(q_lo, q_full, functools.partial(body, head=head, masked=True), carry)
    return lax.fori_loop(q_full, nq, functools.partial(body, head=head, masked=False), carry)

  carry = (tuple(jnp.zeros((bk, n), jnp.float32) for _, n in qk_chunks),
           tuple(jnp.zeros((bk, n), jnp.float32) for _, n in v_chunks))
  dks, dvs = lax.fori_loop(0, g, per_head, carry)
  for (o, n), a in zip(qk_chunks, dks):
    dk_ref[:, pl.ds(o, n)] = (a * cfg.scale).astype(dk_ref.dtype)
  for (o, n), a in zip(v_chunks, dvs):
    dv_ref[:, pl.ds(o, n)] = a.astype(dv_ref.dtype)


def backward(q, k, v, off, q_seg, kv_seg, o, lse, do, cfg: KernelConfig):
  """The Triton backward on padded inputs, for other forwards (the Mosaic GPU one) to reuse.

  q/k/v/o/do as in `_forward` (lengths multiples of cfg.blocks' backward tiles), lse: base-2
  log-sum-exp of the scaled scores [b, h, tq] float32, +inf on rows with no visible key.
  Returns (dq, dk, dv) in the dtypes of q, k, v.
  """
  b, tq, h, dqk = q.shape
  tk, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
  g = h // hk
  di = jnp.einsum("bthe,bthe->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  params = plt.CompilerParams(num_warps=cfg.blocks.num_warps_bwd,
                              num_stages=cfg.blocks.num_stages_bwd)
  seg_args = [q_seg, kv_seg] if cfg.has_segments else []

  bq, bk = _tile(cfg.blocks.block_q_dq, tq), _tile(cfg.blocks.block_k_dq, tk)
  nq, nk = tq // bq, tk // bk
  q_map = lambda i, h_, b_: (b_, nq - 1 - i, h_, 0)
  kv_map = lambda i, h_, b_: (b_, 0, lax.div(h_, g), 0)
  row_map = lambda i, h_, b_: (b_, h_, nq - 1 - i)
  in_specs = [
      pl.BlockSpec((1,), lambda i, h_, b_: (b_,)),
      pl.BlockSpec((None, bq, None, dqk), q_map),
      pl.BlockSpec((None, tk, None, dqk), kv_map),
      pl.BlockSpec((None, tk, None, dv), kv_map),
      pl.BlockSpec((None, bq, None, dv), q_map),
      pl.BlockSpec((None, None, bq), row_map),
      pl.BlockSpec((None, None, bq), row_map),
  ]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda i, h_, b_: (b_, nq - 1 - i)),
                 pl.BlockSpec((None, tk), lambda i, h_, b_: (b_, 0))]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, bq=bq, bk=bk, nq=nq, nk=nk),
      grid=(nq, h, b),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bq, None, dqk), q_map),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params,
      interpret=cfg.interpret,
      name="mla_attention_dq",
  )(off, q, k, v, do, lse, di, *seg_args)

  bq, bk = _tile(cfg.blocks.block_q_dkv, tq), _tile(cfg.blocks.block_k_dkv, tk)
  nq, nk = tq // bq, tk // bk
  group_map = lambda kb, hk_, b_: (b_, 0, hk_, 0)  # the g query heads of kv head hk_
  k_map = lambda kb, hk_, b_: (b_, kb, hk_, 0)
  in_specs = [
      pl.BlockSpec((1,), lambda kb, hk_, b_: (b_,)),
      pl.BlockSpec((None, tq, g, dqk), group_map),
      pl.BlockSpec((None, bk, None, dqk), k_map),
      pl.BlockSpec((None, bk, None, dv), k_map),
      pl.BlockSpec((None, tq, g, dv), group_map),
      pl.BlockSpec((None, g, tq), lambda kb, hk_, b_: (b_, hk_, 0)),
      pl.BlockSpec((None, g, tq), lambda kb, hk_, b_: (b_, hk_, 0)),
  ]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, tq), lambda kb, hk_, b_: (b_, 0)),
                 pl.BlockSpec((None, bk), lambda kb, hk_, b_: (b_, kb))]
  dk, dv_ = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, bq=bq, bk=bk, nq=nq, g=g),
      grid=(nk, hk, b),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bk, None, dqk), k_map),
                 pl.BlockSpec((None, bk, None, dv), k_map)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      interpret=cfg.interpret,
      name="mla_attention_dkv",
  )(off, q, k, v, do, lse, di, *seg_args)
  return dq, dk, dv_


# ----------------------------------------------------------------------------------------------
# Public entry: padding and the custom VJP.


_attention = kernel_vjp(_forward, backward)


def mla_attention(q, k, v, q_offset, segment_ids, *, scale: float, causal: bool,
                  block_sizes: BlockSizes | None = None, interpret: bool = False):
  """GPU kernel path of `mla_attention` (see the package docstring for shapes and semantics).

  q_offset: int32 [batch]; segment_ids: None or (q_seg [batch, q_len], kv_seg [batch, kv_len]).
  """
  blocks = block_sizes or BlockSizes()
  sq, sk = q.shape[1], k.shape[1]
  tq = round_up(sq, max(_tile(x, sq) for x in (blocks.block_q, blocks.block_q_dq,
                                               blocks.block_q_dkv)))
  tk = round_up(sk, max(_tile(x, sk) for x in (blocks.block_k, blocks.block_k_dq,
                                               blocks.block_k_dkv)))
  cfg = KernelConfig(scale=float(scale), causal=causal, has_segments=segment_ids is not None,
                     blocks=blocks, interpret=interpret, kv_len=sk)
  return padded_call(_attention, q, k, v, q_offset, segment_ids, cfg, tq, tk)
