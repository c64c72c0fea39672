"""MLA attention, TPU Pallas (Mosaic): flash-attention forward and backward with dqk != dv.

Layout inside the kernels is head-major ([batch, heads, seq, dim]) so that every block's last
two dims are (rows, full head dim), as Mosaic requires. Grids:
  forward / dq: (batch, heads, q blocks, k blocks)            -- k blocks "arbitrary"
  dk/dv:        (batch, kv heads, k blocks, group, q blocks)  -- accumulates over the group
Causally invisible blocks are skipped with `pl.when`, and their index maps are clamped to the
last visible block so that the pipeline issues no DMA for them.

Per-row statistics are carried as (rows, 128) lane-replicated f32 tiles, per-row vectors that
enter transposed products as (8, n) sublane-replicated rows: both layouts lower without
relayouts.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsv3_jax.kernels_pallas.cost import estimate, mxu_dot
from dsv3_jax.kernels_pallas.mla_attention.reference import (MASK_VALUE, NN, NT, KernelConfig,
                                                             kernel_vjp, kv_block_range, may_mask,
                                                             padded_call, q_block_range, round_up)

__all__ = ["BlockSizes", "mla_attention"]

LANES = 128
SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (rounded to multiples of 128 and clipped to the padded sequence lengths)."""

  block_q: int = 512
  block_k: int = 512
  block_q_dkv: int = 256
  block_k_dkv: int = 512
  block_q_dq: int = 512
  block_k_dq: int = 256


def _block(requested: int, length: int) -> int:
  return min(round_up(requested, LANES), round_up(length, LANES))


def _lanes(x, width: int):
  """(rows, 128) lane-replicated -> (rows, width)."""
  if width == LANES:
    return x
  return jnp.tile(x, (1, -(-width // LANES)))[:, :width]


def _mask(q_start, k_start, shape, *, transposed: bool, causal: bool, kv_len: int, kv_padded: bool,
          q_seg_ref, kv_seg_ref):
  """Visibility of a (q, k) tile, or of its transpose (k, q) when `transposed`."""
  q_axis, k_axis = (1, 0) if transposed else (0, 1)
  k_pos = k_start + lax.broadcasted_iota(jnp.int32, shape, k_axis)
  mask = None

  def _and(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if causal:
    mask = _and(mask, k_pos <= q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis))
  if kv_padded:
    mask = _and(mask, k_pos < kv_len)
  if q_seg_ref is not None:
    if transposed:  # kv ids as lane-replicated columns, q ids as a row
      kv_ids = jnp.tile(kv_seg_ref[...], (1, shape[1] // LANES))
      q_ids = q_seg_ref[:1, :]
    else:
      q_ids = jnp.tile(q_seg_ref[...], (1, shape[1] // LANES))
      kv_ids = kv_seg_ref[:1, :]
    mask = _and(mask, q_ids == kv_ids)
  return mask


def _pairs(b: int, h: int, tq: int, tk: int, cfg: KernelConfig) -> int:
  """(query, key) score entries computed: about half of tq x tk when causal."""
  return b * h * tq * tk // (2 if cfg.causal else 1)


def _compiler_params(sem):
  return pltpu.CompilerParams(dimension_semantics=sem)


# ----------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(off_ref, q_ref, k_ref, v_ref, *refs, cfg: KernelConfig, bq: int, bk: int, nk: int,
                kv_len: int, save_lse: bool):
  if cfg.has_segments:
    q_seg_ref, kv_seg_ref, *refs = refs
  else:
    q_seg_ref = kv_seg_ref = None
  if save_lse:
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
  else:
    (o_ref, m_ref, l_ref, acc_ref), lse_ref = refs, None
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  dv = acc_ref.shape[-1]

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  q_start = off_ref[b] + i * bq
  n_full, n_end = kv_block_range(q_start, block_q=bq, block_k=bk, num_k_blocks=nk, kv_len=kv_len,
                                 causal=cfg.causal, has_segments=cfg.has_segments)

  def step(masked: bool):
    s = mxu_dot(q_ref[...], k_ref[...], NT)
    s = s * cfg.scale  # (bq, bk)
    mask = None
    if masked:
      mask = _mask(q_start, j * bk, s.shape, transposed=False, causal=cfg.causal, kv_len=kv_len,
                   kv_padded=kv_len % bk != 0, q_seg_ref=q_seg_ref, kv_seg_ref=kv_seg_ref)
      s = jnp.where(mask, s, MASK_VALUE)
    m_prev, l_prev = m_ref[...], l_ref[...]
    m_next = jnp.maximum(m_prev, s.max(axis=-1)[:, None])  # (bq, 128)
    p = jnp.exp(s - _lanes(m_next, bk))
    if masked:
      p = jnp.where(mask, p, 0.0)  # a row masked so far must not pick up exp(0) = 1
    alpha = jnp.exp(m_prev - m_next)
    l_ref[...] = alpha * l_prev + lax.broadcast_in_dim(p.sum(axis=-1), l_prev.shape, (0,))
    m_ref[...] = m_next
    v = v_ref[...]
    pv = mxu_dot(p.astype(v.dtype), v, NN)
    acc_ref[...] = acc_ref[...] * _lanes(alpha, dv) + pv

  pl.when(j < n_full)(lambda: step(False))
  if may_mask(cfg, bk):
    pl.when(jnp.logical_and(j >= n_full, j < n_end))(lambda: step(True))

  @pl.when(j == nk - 1)
  def _finish():
    l, m = l_ref[...], m_ref[...]
    inv = jnp.where(l > 0.0, 1.0 / l, 0.0)
    o_ref[...] = (acc_ref[...] * _lanes(inv, dv)).astype(o_ref.dtype)
    if save_lse:
      lse_ref[...] = jnp.where(l > 0.0, m + jnp.log(l), jnp.inf)


def _forward(q, k, v, off, q_seg, kv_seg, cfg: KernelConfig, save_lse: bool):
  """q/k/v in [b, h, t, d] layout, already padded -> o [b, h, t, dv] (and lse [b, h, t])."""
  b, h, tq, dqk = q.shape
  hk, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
  g = h // hk
  bq, bk = _tile(cfg.blocks.block_q, tq), _tile(cfg.blocks.block_k, tk)
  nq, nk = tq // bq, tk // bk
  kv_len = cfg.kv_len

  def kv_index(b_, h_, i, j, off_ref):
    _, n_end = kv_block_range(off_ref[b_] + i * bq, block_q=bq, block_k=bk, num_k_blocks=nk,
                              kv_len=kv_len, causal=cfg.causal, has_segments=cfg.has_segments)
    return b_, lax.div(h_, g), jnp.minimum(j, jnp.maximum(n_end - 1, 0)), 0

  in_specs = [
      pl.BlockSpec((None, None, bq, dqk), lambda b_, h_, i, j, o: (b_, h_, i, 0)),
      pl.BlockSpec((None, None, bk, dqk), kv_index),
      pl.BlockSpec((None, None, bk, dv), kv_index),
  ]
  args = [q, k, v]
  if cfg.has_segments:
    in_specs += [
        pl.BlockSpec((None, bq, LANES), lambda b_, h_, i, j, o: (b_, i, 0)),
        pl.BlockSpec((None, SUBLANES, bk),
                     lambda b_, h_, i, j, o: (b_, 0, kv_index(b_, h_, i, j, o)[2])),
    ]
    args += [jnp.broadcast_to(q_seg[:, :, None], (b, tq, LANES)),
             jnp.broadcast_to(kv_seg[:, None, :], (b, SUBLANES, tk))]
  kernel = functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bk=bk, nk=nk, kv_len=kv_len,
                             save_lse=save_lse)
  # lse leaves the kernel lane-replicated ((bq, 128) tiles store without relayout); the
  # transient [b, h, t, 128] array is sliced to [b, h, t] right away.
  out_specs = [pl.BlockSpec((None, None, bq, dv), lambda b_, h_, i, j, o: (b_, h_, i, 0))]
  out_shape = [jax.ShapeDtypeStruct((b, h, tq, dv), q.dtype)]
  if save_lse:
    out_specs.append(pl.BlockSpec((None, None, bq, LANES), lambda b_, h_, i, j, o: (b_, h_, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, h, tq, LANES), jnp.float32))
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, h, nq, nk),
          in_specs=in_specs,
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, dv), jnp.float32)],
      ),
      out_shape=out_shape,
      compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="mla_attention_fwd",
      cost_estimate=estimate(2 * _pairs(b, h, tq, tk, cfg) * (dqk + dv), _pairs(b, h, tq, tk, cfg),
                             reads=args, writes=out_shape),
  )(off, *args)
  return (outs[0], outs[1][..., 0]) if save_lse else outs[0]


# ----------------------------------------------------------------------------------------------
# Backward: dq over key blocks; dk/dv over (group, query blocks).


def _dq_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, cfg: KernelConfig, bq: int,
               bk: int, nk: int, kv_len: int):
  if cfg.has_segments:
    q_seg_ref, kv_seg_ref, *refs = refs
  else:
    q_seg_ref = kv_seg_ref = None
  dq_ref, acc_ref = refs
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  q_start = off_ref[b] + i * bq
  n_full, n_end = kv_block_range(q_start, block_q=bq, block_k=bk, num_k_blocks=nk, kv_len=kv_len,
                                 causal=cfg.causal, has_segments=cfg.has_segments)

  def step(masked: bool):
    k = k_ref[...]
    s = mxu_dot(q_ref[...], k, NT) * cfg.scale
    if masked:
      mask = _mask(q_start, j * bk, s.shape, transposed=False, causal=cfg.causal, kv_len=kv_len,
                   kv_padded=kv_len % bk != 0, q_seg_ref=q_seg_ref, kv_seg_ref=kv_seg_ref)
      s = jnp.where(mask, s, MASK_VALUE)
    lse = jnp.expand_dims(lse_ref[0], -1)  # (bq, 1); +inf on rows that see nothing
    p = jnp.exp(s - lse)
    dp = mxu_dot(do_ref[...], v_ref[...], NT)
    ds = p * (dp - jnp.expand_dims(di_ref[0], -1))
    acc_ref[...] += mxu_dot(ds.astype(k.dtype), k, NN)

  pl.when(j < n_full)(lambda: step(False))
  if may_mask(cfg, bk):
    pl.when(jnp.logical_and(j >= n_full, j < n_end))(lambda: step(True))

  @pl.when(j == nk - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, *refs, cfg: KernelConfig,
                bq: int, bk: int, nq: int, g: int, kv_len: int):
  if cfg.has_segments:
    q_seg_ref, kv_seg_ref, *refs = refs
  else:
    q_seg_ref = kv_seg_ref = None
  dk_ref, dv_ref, dk_acc, dv_acc = refs
  b, kb, gi, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when(jnp.logical_and(gi == 0, i == 0))
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  off = off_ref[b]
  k_start = kb * bk
  q_lo, q_full = q_block_range(k_start, off, block_q=bq, block_k=bk, num_q_blocks=nq,
                               kv_len=kv_len, causal=cfg.causal, has_segments=cfg.has_segments)

  def step(masked: bool):
    q, do = q_ref[...], do_ref[...]
    # Transposed tile (keys x queries): every product below is a plain or rhs-transposed matmul.
    st = mxu_dot(k_ref[...], q, NT) * cfg.scale
    if masked:
      mask = _mask(off + i * bq, k_start, st.shape, transposed=True, causal=cfg.causal,
                   kv_len=kv_len, kv_padded=kv_len % bk != 0, q_seg_ref=q_seg_ref,
                   kv_seg_ref=kv_seg_ref)
      st = jnp.where(mask, st, MASK_VALUE)
    pt = jnp.exp(st - lse_ref[:1, :])  # (bk, bq)
    dv_acc[...] += mxu_dot(pt.astype(do.dtype), do, NN)
    dpt = mxu_dot(v_ref[...], do, NT)
    dst = pt * (dpt - di_ref[:1, :])
    dk_acc[...] += mxu_dot(dst.astype(q.dtype), q, NN)

  if may_mask(cfg, bk):
    pl.when(jnp.logical_and(i >= q_lo, i < q_full))(lambda: step(True))
  pl.when(i >= q_full)(lambda: step(False))

  @pl.when(jnp.logical_and(gi == g - 1, i == nq - 1))
  def _finish():
    dk_ref[...] = (dk_acc[...] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _backward(q, k, v, off, q_seg, kv_seg, o, lse, do, cfg: KernelConfig):
  """All arrays in padded [b, h, t, d] layout; lse [b, h, t]. Returns dq, dk, dv (same layout)."""
  b, h, tq, dqk = q.shape
  hk, tk, dv = k.shape[1], k.shape[2], v.shape[-1]
  g = h // hk
  kv_len = cfg.kv_len
  di = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [b, h, t]

  # dq: grid (b, h, q blocks, k blocks).
  bq, bk = _tile(cfg.blocks.block_q_dq, tq), _tile(cfg.blocks.block_k_dq, tk)
  nq, nk = tq // bq, tk // bk

  def kv_index(b_, h_, i, j, off_ref):
    _, n_end = kv_block_range(off_ref[b_] + i * bq, block_q=bq, block_k=bk, num_k_blocks=nk,
                              kv_len=kv_len, causal=cfg.causal, has_segments=cfg.has_segments)
    return b_, lax.div(h_, g), jnp.minimum(j, jnp.maximum(n_end - 1, 0)), 0

  def q_index(b_, h_, i, j, off_ref):
    return b_, h_, i, 0

  in_specs = [
      pl.BlockSpec((None, None, bq, dqk), q_index),
      pl.BlockSpec((None, None, bk, dqk), kv_index),
      pl.BlockSpec((None, None, bk, dv), kv_index),
      pl.BlockSpec((None, None, bq, dv), q_index),
      pl.BlockSpec((None, None, 1, bq), lambda b_, h_, i, j, o_: (b_, h_, 0, i)),
      pl.BlockSpec((None, None, 1, bq), lambda b_, h_, i, j, o_: (b_, h_, 0, i)),
  ]
  args = [q, k, v, do, lse[:, :, None, :], di[:, :, None, :]]
  if cfg.has_segments:
    in_specs += [
        pl.BlockSpec((None, bq, LANES), lambda b_, h_, i, j, o_: (b_, i, 0)),
        pl.BlockSpec((None, SUBLANES, bk),
                     lambda b_, h_, i, j, o_: (b_, 0, kv_index(b_, h_, i, j, o_)[2])),
    ]
    args += [jnp.broadcast_to(q_seg[:, :, None], (b, tq, LANES)),
             jnp.broadcast_to(kv_seg[:, None, :], (b, SUBLANES, tk))]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg, bq=bq, bk=bk, nk=nk, kv_len=kv_len),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, h, nq, nk),
          in_specs=in_specs,
          out_specs=pl.BlockSpec((None, None, bq, dqk), q_index),
          scratch_shapes=[pltpu.VMEM((bq, dqk), jnp.float32)],
      ),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=cfg.interpret,
      name="mla_attention_dq",
      cost_estimate=estimate(2 * _pairs(b, h, tq, tk, cfg) * (2 * dqk + dv),
                             _pairs(b, h, tq, tk, cfg), reads=args, writes=[q]),
  )(off, *args)

  # dk/dv: grid (b, kv heads, k blocks, group, q blocks).
  bq, bk = _tile(cfg.blocks.block_q_dkv, tq), _tile(cfg.blocks.block_k_dkv, tk)
  nq, nk = tq // bq, tk // bk

  def q_index_t(b_, hk_, kb, gi, i, off_ref):
    q_lo, _ = q_block_range(kb * bk, off_ref[b_], block_q=bq, block_k=bk, num_q_blocks=nq,
                            kv_len=kv_len, causal=cfg.causal, has_segments=cfg.has_segments)
    return b_, hk_ * g + gi, jnp.minimum(jnp.maximum(i, q_lo), nq - 1), 0

  def k_index_t(b_, hk_, kb, gi, i, off_ref):
    return b_, hk_, kb, 0

  def row_index(b_, hk_, kb, gi, i, off_ref):
    _, h_, qi, _ = q_index_t(b_, hk_, kb, gi, i, off_ref)
    return b_, h_, 0, qi

  in_specs = [
      pl.BlockSpec((None, None, bq, dqk), q_index_t),
      pl.BlockSpec((None, None, bk, dqk), k_index_t),
      pl.BlockSpec((None, None, bk, dv), k_index_t),
      pl.BlockSpec((None, None, bq, dv), q_index_t),
      pl.BlockSpec((None, None, SUBLANES, bq), row_index),
      pl.BlockSpec((None, None, SUBLANES, bq), row_index),
  ]
  rows = lambda x: jnp.broadcast_to(x[:, :, None, :], (b, h, SUBLANES, tq))
  args = [q, k, v, do, rows(lse), rows(di)]
  if cfg.has_segments:
    in_specs += [
        pl.BlockSpec((None, SUBLANES, bq),
                     lambda *ix: (ix[0], 0, q_index_t(*ix)[2])),
        pl.BlockSpec((None, bk, LANES), lambda b_, hk_, kb, gi, i, o_: (b_, kb, 0)),
    ]
    args += [jnp.broadcast_to(q_seg[:, None, :], (b, SUBLANES, tq)),
             jnp.broadcast_to(kv_seg[:, :, None], (b, tk, LANES))]
  dk, dv_ = pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg, bq=bq, bk=bk, nq=nq, g=g, kv_len=kv_len),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, hk, nk, g, nq),
          in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, bk, dqk), k_index_t),
                     pl.BlockSpec((None, None, bk, dv), k_index_t)],
          scratch_shapes=[pltpu.VMEM((bk, dqk), jnp.float32), pltpu.VMEM((bk, dv), jnp.float32)],
      ),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_compiler_params(
          ("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
      interpret=cfg.interpret,
      name="mla_attention_dkv",
      cost_estimate=estimate(2 * _pairs(b, h, tq, tk, cfg) * (2 * dqk + 2 * dv),
                             _pairs(b, h, tq, tk, cfg), reads=args, writes=[k, v]),
  )(off, *args)
  return dq, dk, dv_


# ----------------------------------------------------------------------------------------------
# Public entry: layout change, padding and the custom VJP.


def _tile(requested: int, padded_len: int) -> int:
  """Largest multiple of 128 <= `requested` that divides `padded_len` (a multiple of 128)."""
  block = min(round_up(requested, LANES), padded_len)
  while padded_len % block:
    block -= LANES
  return block


_attention = kernel_vjp(_forward, _backward)


def mla_attention(q, k, v, q_offset, segment_ids, *, scale: float, causal: bool,
                  block_sizes: BlockSizes | None = None, interpret: bool = False):
  """TPU kernel path of `mla_attention` (see the package docstring for shapes and semantics).

  q_offset: int32 [batch]; segment_ids: None or (q_seg [batch, q_len], kv_seg [batch, kv_len]).
  """
  blocks = block_sizes or BlockSizes()
  b, sq, _, _ = q.shape
  sk = k.shape[1]
  tq = round_up(sq, max(_block(x, sq) for x in (blocks.block_q, blocks.block_q_dq,
                                                blocks.block_q_dkv)))
  tk = round_up(sk, max(_block(x, sk) for x in (blocks.block_k, blocks.block_k_dq,
                                                blocks.block_k_dkv)))
  cfg = KernelConfig(scale=float(scale), causal=causal, has_segments=segment_ids is not None,
                     blocks=blocks, interpret=interpret, kv_len=sk)
  o = padded_call(_attention, *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)), q_offset, segment_ids,
                  cfg, tq, tk, seq_axis=2)
  return jnp.swapaxes(o, 1, 2)
