"""Absorbed-MLA decode, TPU Pallas (Mosaic), split-K, contiguous or paged latent cache.

Grid (batch, splits, chunks per split); the last axis is "arbitrary" and carries the online
softmax in VMEM. All query heads of a sequence form one block, so each cache row is read from
HBM once for all heads. The cache arrives in its two lane-aligned parts (see the package
docstring), each DMA'd in place from the stacked [L, ...] buffers (the layer index is a
scalar-prefetched operand of the index maps, so no per-layer slice exists in HBM): a latent
block (block_k, C) and a transposed rope block (R, block_k); scores are
q_lat (h, C) x latent^T + q_pe (h, R) x rope, two MXU dots, then p (h, block_k) x latent.

Split s of sequence b covers chunks [s * cps_b, min((s + 1) * cps_b, n_b)) of its own length
(n_b = ceil(len_b / block), cps_b = ceil(n_b / splits)), so splits stay balanced for every
length. Steps past a sequence's end are skipped and their index maps repeat the last block, so
no DMA is issued for them. Lengths, the layer and block tables arrive by scalar prefetch (SMEM).

Multi-token queries (q [b, T, h, d], speculative verification) are folded into the row dimension
of the block: rows = T * h, row r belongs to token t = r // h and sees the first
lengths[b] - (T - 1 - t) cache rows, so each cache block is still DMA'd once for all T tokens.
Chunks are split by the longest row length; a step needs the (per-row) mask unless every row
sees the whole chunk.
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
from dsv3_jax.kernels_pallas.mla_decode.reference import combine_splits

__all__ = ["BlockSizes", "mla_decode"]

LANES = 128
MASK_VALUE = -1e30
NN = (((1,), (0,)), ((), ()))
NT = (((1,), (1,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_k: cache rows per grid step (contiguous cache: a multiple of 128, clipped to the
  length; paged: the page when it is <= block_k, else the largest multiple of 128 <= block_k
  that divides the page, else the whole page; the rope block's minor dim is these rows). num_splits: split-K factor (None: 1, or 2 for a single sequence so both cores of
  a megacore chip get work)."""

  block_k: int = 512
  num_splits: int | None = None


def _lanes(x, width: int):
  if width <= LANES:
    return x[:, :width]
  return jnp.tile(x, (1, -(-width // LANES)))[:, :width]


def _chunk(b, s, j, len_ref, *, bk: int, splits: int):
  """(chunk index, is a real step, chunk index clamped for the index map)."""
  n = lax.div(len_ref[b] + bk - 1, bk)
  cps = lax.div(n + splits - 1, splits)
  c = s * cps + j
  last = jnp.minimum((s + 1) * cps, n) - 1
  return c, jnp.logical_and(j < cps, c < n), jnp.maximum(jnp.minimum(c, last), 0)


def _kernel(len_ref, layer_ref, *refs, scale: float, rank: int, bk: int, splits: int,
            paged: bool, n_steps: int, heads: int, tokens: int):
  del layer_ref  # used by the index maps only
  if paged:
    refs = refs[1:]  # block tables: likewise
  q_ref, lat_ref, rope_ref, *out_refs, m_ref, l_ref, acc_ref = refs
  b, s, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = len_ref[b]
  c, real, _ = _chunk(b, s, j, len_ref, bk=bk, splits=splits)

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked: bool):
    q, lat = q_ref[...], lat_ref[...]  # lat (bk, rank): scores and values
    sc = mxu_dot(q[:, :rank], lat, NT)
    sc += mxu_dot(q[:, rank:], rope_ref[...], NN)  # (h, R) x (R, bk)
    sc = sc * scale  # (heads, bk)
    if masked:
      row_len = length
      if tokens > 1:  # row r is token t = r // heads: it sees length - (T - 1 - t) rows
        row = lax.broadcasted_iota(jnp.int32, sc.shape, 0)
        row_len = length - (tokens - 1) + sum(
            (row >= k * heads).astype(jnp.int32) for k in range(1, tokens))
      valid = c * bk + lax.broadcasted_iota(jnp.int32, sc.shape, 1) < row_len
      sc = jnp.where(valid, sc, MASK_VALUE)
      # Rows past the end may hold anything (stale pages, NaN padding): 0 * NaN would leak.
      lat = jnp.where(c * bk + lax.broadcasted_iota(jnp.int32, lat.shape, 0) < length, lat, 0)
    m_prev, l_prev = m_ref[...], l_ref[...]
    m_next = jnp.maximum(m_prev, sc.max(axis=-1)[:, None])
    p = jnp.exp(sc - _lanes(m_next, bk))
    if masked:
      p = jnp.where(valid, p, 0.0)
    alpha = jnp.exp(m_prev - m_next)
    l_ref[...] = alpha * l_prev + lax.broadcast_in_dim(p.sum(axis=-1), l_prev.shape, (0,))
    m_ref[...] = m_next
    acc_ref[...] = acc_ref[...] * _lanes(alpha, rank) + mxu_dot(p.astype(lat.dtype), lat, NN)

  full = (c + 1) * bk <= length - (tokens - 1)  # every row sees the whole chunk
  pl.when(jnp.logical_and(real, full))(lambda: step(False))
  pl.when(jnp.logical_and(real, jnp.logical_not(full)))(lambda: step(True))

  @pl.when(j == n_steps - 1)
  def _finish():
    l, m = l_ref[...], m_ref[...]
    o = acc_ref[...] * _lanes(jnp.where(l > 0.0, 1.0 / l, 0.0), rank)
    out_refs[0][...] = o.astype(out_refs[0].dtype)
    if len(out_refs) > 1:
      out_refs[1][...] = jnp.where(l > 0.0, m + jnp.log(l), -jnp.inf)


def _paged_block(page_size: int, block_k: int) -> int:
  """Rows per step of a paged cache: the rope block (R, rows) needs rows % 128 == 0 or the
  whole page."""
  if page_size <= block_k:
    return page_size
  for bk in range(block_k - block_k % LANES, LANES - 1, -LANES):
    if page_size % bk == 0:
      return bk
  return page_size


def _one_layer(*stacked):
  return [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in stacked]


def mla_decode(q, latent, rope, lengths, layer, block_tables, *, scale: float,
               block_sizes: BlockSizes | None = None, interpret: bool = False):
  """TPU kernel path of `mla_decode` (see the package docstring): q [b, h, d] or [b, T, h, d]
  (token t sees lengths[b] - (T - 1 - t) rows); latent [L, b | pages, rows, C], rope
  [L, b | pages, R, rows]; layer int32 [1]. Returns [b, h, C] / [b, T, h, C] q.dtype."""
  blocks = block_sizes or BlockSizes()
  rank, rope_dims = latent.shape[-1], rope.shape[-2]
  out_shape4 = q.shape[:-1] + (rank,) if q.ndim == 4 else None
  tokens, heads = (q.shape[1], q.shape[2]) if q.ndim == 4 else (1, q.shape[1])
  q = q.reshape(q.shape[0], tokens * heads, q.shape[-1])  # rows = T * h, token-major
  b, h, d = q.shape
  paged = block_tables is not None
  if paged:
    _, num_pages, page, _ = latent.shape
    pps = block_tables.shape[1]
    bk = _paged_block(page, blocks.block_k)
    capacity, n_chunks = pps * page, pps * (page // bk)
  else:
    capacity = latent.shape[2]
    bk = capacity if capacity < LANES else min(blocks.block_k // LANES * LANES,
                                               capacity // LANES * LANES)
    n_chunks = -(-capacity // bk)
  splits = blocks.num_splits or (2 if b == 1 and n_chunks > 1 else 1)
  splits = max(1, min(splits, n_chunks))
  n_steps = -(-n_chunks // splits)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, capacity)

  def cache_block(b_, s, j, len_ref, layer_ref, *bt):
    """(layer, sequence or pool page, block of rows within it)."""
    _, _, c = _chunk(b_, s, j, len_ref, bk=bk, splits=splits)
    if not paged:
      return layer_ref[0], b_, c
    bpp = page // bk
    phys = bt[0][b_ * pps + lax.div(c, bpp)]
    return layer_ref[0], jnp.clip(phys, 0, num_pages - 1), lax.rem(c, bpp)

  def latent_index(*args):
    return (*cache_block(*args), 0)

  def rope_index(*args):
    layer_, seq, c = cache_block(*args)
    return layer_, seq, 0, c

  in_specs = [pl.BlockSpec((None, h, d), lambda b_, s, j, *_: (b_, 0, 0)),
              pl.BlockSpec((None, None, bk, rank), latent_index),
              pl.BlockSpec((None, None, rope_dims, bk), rope_index)]
  prefetch = [lengths, layer]
  if paged:
    prefetch.append(block_tables.astype(jnp.int32).reshape(-1))
  if splits == 1:
    out_specs = [pl.BlockSpec((None, h, rank), lambda b_, s, j, *_: (b_, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, h, rank), q.dtype)]
  else:
    out_specs = [pl.BlockSpec((None, None, h, rank), lambda b_, s, j, *_: (b_, s, 0, 0)),
                 pl.BlockSpec((None, None, h, LANES), lambda b_, s, j, *_: (b_, s, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, splits, h, rank), jnp.float32),
                 jax.ShapeDtypeStruct((b, splits, h, LANES), jnp.float32)]
  kernel = functools.partial(_kernel, scale=float(scale), rank=rank, bk=bk, splits=splits,
                             paged=paged, n_steps=n_steps, heads=heads, tokens=tokens)
  outs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(prefetch),
          grid=(b, splits, n_steps),
          in_specs=in_specs,
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((h, LANES), jnp.float32), pltpu.VMEM((h, LANES), jnp.float32),
                          pltpu.VMEM((h, rank), jnp.float32)],
      ),
      out_shape=out_shape,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="mla_decode",
      # One layer's cache is read (the other layers of the stack are not touched).
      cost_estimate=estimate(2 * b * h * capacity * (d + rank), b * h * capacity,
                             reads=[q, *_one_layer(latent, rope)] + prefetch, writes=out_shape),
  )(*prefetch, q, latent, rope)
  if splits == 1:
    out = outs[0]
  else:
    o, lse = outs
    out = combine_splits(o, lse[..., 0]).astype(q.dtype)
  return out if out_shape4 is None else out.reshape(out_shape4)
