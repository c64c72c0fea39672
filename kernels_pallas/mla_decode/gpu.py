"""Absorbed-MLA decode, GPU Pallas (Triton lowering), split-K, contiguous or paged latent cache.

Grid (head blocks, splits, batch): the head-block axis varies fastest, so the programs that share
a cache range run side by side and the 2nd..nth read of each cache tile comes from L2. Each
program walks its split of the cache in `block_k`-row chunks, computing q.c over the latent part
and q_pe.k_pe over the rope part as separate power-of-two dots (512 + 64), and accumulates
softmax . c in float32 registers.

Split s of sequence b covers chunks [s * cps_b, min((s + 1) * cps_b, n_b)) of its own length, so
splits stay balanced for any length. A contiguous cache whose capacity is not a multiple of
block_k reads its last chunk shifted back to end at the capacity (never out of bounds), masking
the rows that an earlier chunk already covered.

Multi-token queries (q [b, T, h, d], speculative verification) are folded into the row dimension
before the kernel: rows = T * h, row r belongs to token t = r // h and sees the first
lengths[b] - (T - 1 - t) cache rows. The head-block grid axis walks these rows, chunks are split
by the longest row length, and the per-row length mask is the only change to the inner loop;
chunks below the shortest row length need no mask.
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

from dsv3_jax.kernels_pallas.mla_attention.gpu import pow2_chunks
from dsv3_jax.kernels_pallas.mla_attention.reference import pad_to, round_up
from dsv3_jax.kernels_pallas.mla_decode.reference import combine_splits

__all__ = ["BlockSizes", "mla_decode"]

MASK_VALUE = -1e30
LOG2E = math.log2(math.e)
NN = (((1,), (0,)), ((), ()))
NT = (((1,), (1,)), ((), ()))
_TARGET_PROGRAMS = 264  # about two waves on a 132-SM H100


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_k: cache rows per step (power of two >= 16; paged: clipped to the page size, which
  must then be a power of two). block_h: query heads per program (power of two >= 16).
  num_splits: split-K factor (None: enough programs to fill the GPU)."""

  block_k: int = 64
  block_h: int = 32
  num_splits: int | None = None
  num_warps: int = 8
  num_stages: int = 2


def _row_lengths(length, row0, rows: int, heads: int, tokens: int):
  """Visible cache rows of query rows row0 .. row0 + rows - 1 (row r is token r // heads of
  `tokens`; padding rows past tokens * heads count as the last token) -> int32 [rows]."""
  row = row0 + jnp.arange(rows, dtype=jnp.int32)
  t = sum((row >= k * heads).astype(jnp.int32) for k in range(1, tokens))
  return length - (tokens - 1) + t


def _kernel(len_ref, *refs, scale: float, rank: int, bk: int, splits: int, page: int | None,
            capacity: int, heads: int, tokens: int):
  if page is not None:
    bt_ref, q_ref, c_ref, *out_refs = refs
  else:
    (q_ref, c_ref, *out_refs), bt_ref = refs, None
  d = q_ref.shape[-1]
  lat_chunks = pow2_chunks(rank)
  pe_chunks = tuple((rank + o, n) for o, n in pow2_chunks(d - rank))
  s = pl.program_id(1)
  length = len_ref[0]
  n = lax.div(length + bk - 1, bk)
  cps = lax.div(n + splits - 1, splits)
  c0 = s * cps
  c1 = jnp.minimum(c0 + cps, n)
  min_len = jnp.maximum(length - (tokens - 1), 0)  # the shortest row length
  c_mid = jnp.clip(lax.div(min_len, bk), c0, jnp.maximum(c1, c0))  # chunks below need no mask
  qs = [q_ref[:, pl.ds(o, w)] for o, w in lat_chunks + pe_chunks]
  bh = q_ref.shape[0]
  row_len = None if tokens == 1 else _row_lengths(length, pl.program_id(0) * bh, bh, heads,
                                                   tokens)
  qk_scale = scale * LOG2E

  def load(c, chunks):
    """Chunk c of this sequence -> (row tiles, absolute position of tile row 0)."""
    if page is None:
      start = jnp.minimum(c * bk, capacity - bk)
      rows = pl.ds(start, bk)
      return [c_ref[rows, pl.ds(o, w)] for o, w in chunks], start
    pos = c * bk
    phys = bt_ref[lax.div(pos, page)]
    rows = pl.ds(pl.multiple_of(lax.rem(pos, page), bk), bk)
    return [c_ref[phys, rows, pl.ds(o, w)] for o, w in chunks], pos

  def body(c, carry, masked: bool):
    accs, m, l = carry
    tiles, start = load(c, lat_chunks + pe_chunks)
    sc = None
    for qc, kc in zip(qs, tiles):
      dot = lax.dot_general(qc, kc, NT, preferred_element_type=jnp.float32)
      sc = dot if sc is None else sc + dot
    sc = sc * qk_scale  # (block_h, bk)
    lat = tiles[:len(lat_chunks)]
    if masked:
      pos = start + jnp.arange(bk, dtype=jnp.int32)
      valid = jnp.logical_and(pos >= c * bk, pos < length)  # shifted last chunk: skip seen rows
      # Rows past the end may hold anything (stale pages): 0 * NaN would leak into the sum.
      lat = [jnp.where(valid[:, None], t, jnp.zeros_like(t)) for t in lat]
      valid = valid[None, :]
      if row_len is not None:  # per query row: token t sees length - (T - 1 - t) rows
        valid = jnp.logical_and(valid, pos[None, :] < row_len[:, None])
      sc = jnp.where(valid, sc, MASK_VALUE)
    m_next = jnp.maximum(m, sc.max(axis=1))
    alpha = jnp.exp2(m - m_next)
    p = jnp.exp2(sc - m_next[:, None])
    if masked:
      p = jnp.where(valid, p, 0.0)
    l = l * alpha + p.sum(axis=1)
    p = p.astype(lat[0].dtype)
    accs = tuple(a * alpha[:, None] + lax.dot_general(p, t, NN, preferred_element_type=jnp.float32)
                 for a, t in zip(accs, lat))
    return accs, m_next, l

  carry = (tuple(jnp.zeros((bh, w), jnp.float32) for _, w in lat_chunks),
           jnp.full((bh,), MASK_VALUE, jnp.float32), jnp.zeros((bh,), jnp.float32))
  carry = lax.fori_loop(c0, c_mid, functools.partial(body, masked=False), carry)
  accs, m, l = lax.fori_loop(c_mid, c1, functools.partial(body, masked=True), carry)
  inv = jnp.where(l > 0.0, 1.0 / l, 0.0)
  o_ref = out_refs[0]
  for (o, w), a in zip(lat_chunks, accs):
    o_ref[:, pl.ds(o, w)] = (a * inv[:, None]).astype(o_ref.dtype)
  if len(out_refs) > 1:
    out_refs[1][...] = jnp.where(l > 0.0, m + jnp.log2(l), -jnp.inf)


def mla_decode(q, cache, lengths, block_tables, *, scale: float, kv_lora_rank: int,
               block_sizes: BlockSizes | None = None, interpret: bool = False):
  """GPU kernel path of `mla_decode` (see the package docstring): q [b, h, d] or [b, T, h, d]
  (token t sees lengths[b] - (T - 1 - t) rows). Returns [b, h, rank] / [b, T, h, rank] q.dtype."""
  blocks = block_sizes or BlockSizes()
  for name in ("block_k", "block_h"):
    x = getattr(blocks, name)
    if x < 16 or x & (x - 1):
      raise ValueError(f"GPU {name} must be a power of two >= 16; got {x}")
  out_shape4 = q.shape[:-1] + (kv_lora_rank,) if q.ndim == 4 else None
  tokens, heads = (q.shape[1], q.shape[2]) if q.ndim == 4 else (1, q.shape[1])
  q = q.reshape(q.shape[0], tokens * heads, q.shape[-1])  # rows = T * h, token-major
  b, h, d = q.shape
  rank = kv_lora_rank
  if rank % 16 or (d - rank) % 16:
    raise ValueError(f"the GPU kernel needs latent and rope dims that are multiples of 16; got "
                     f"{rank} and {d - rank}")
  bh = min(blocks.block_h, max(16, pl.next_power_of_2(h)))
  hp = round_up(h, bh)
  q = pad_to(q, 1, hp)
  nh = hp // bh
  paged = block_tables is not None
  if paged:
    page = cache.shape[1]
    if page & (page - 1):
      raise ValueError(f"the GPU kernel needs a power-of-two page size; got {page}")
    bk = min(blocks.block_k, page)
    if bk < 16:
      raise ValueError(f"page size {page} is below the Triton dot minimum of 16")
    capacity = block_tables.shape[1] * page
  else:
    page = None
    if cache.shape[1] < 16:
      cache = pad_to(cache, 1, 16)  # a few rows: cheaper than a special case
    capacity = cache.shape[1]
    bk = min(blocks.block_k, 1 << (capacity.bit_length() - 1))  # <= capacity
  n_chunks = -(-capacity // bk)
  splits = blocks.num_splits or max(1, min(-(-_TARGET_PROGRAMS // (nh * b)), n_chunks // 4))
  splits = max(1, min(splits, n_chunks))
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, capacity)

  in_specs = [pl.BlockSpec((1,), lambda hb, s, b_: (b_,))]
  args = [lengths]
  if paged:
    in_specs.append(pl.BlockSpec((None, block_tables.shape[1]), lambda hb, s, b_: (b_, 0)))
    args.append(block_tables.astype(jnp.int32))
    cache_spec = pl.BlockSpec(cache.shape, lambda hb, s, b_: (0, 0, 0))  # the whole pool
  else:
    cache_spec = pl.BlockSpec((None, capacity, d), lambda hb, s, b_: (b_, 0, 0))
  in_specs += [pl.BlockSpec((None, bh, d), lambda hb, s, b_: (b_, hb, 0)), cache_spec]
  args += [q, cache]
  if splits == 1:
    out_specs = [pl.BlockSpec((None, bh, rank), lambda hb, s, b_: (b_, hb, 0))]
    out_shape = [jax.ShapeDtypeStruct((b, hp, rank), q.dtype)]
  else:
    out_specs = [pl.BlockSpec((None, None, bh, rank), lambda hb, s, b_: (b_, s, hb, 0)),
                 pl.BlockSpec((None, None, bh), lambda hb, s, b_: (b_, s, hb))]
    out_shape = [jax.ShapeDtypeStruct((b, splits, hp, rank), jnp.float32),
                 jax.ShapeDtypeStruct((b, splits, hp), jnp.float32)]
  outs = pl.pallas_call(
      functools.partial(_kernel, scale=float(scale), rank=rank, bk=bk, splits=splits, page=page,
                        capacity=capacity, heads=heads, tokens=tokens),
      grid=(nh, splits, b),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plt.CompilerParams(num_warps=blocks.num_warps,
                                         num_stages=blocks.num_stages),
      interpret=interpret,
      name="mla_decode",
  )(*args)
  if splits == 1:
    out = outs[0][:, :h]
  else:
    o, lse = outs
    out = combine_splits(o[:, :, :h], lse[:, :, :h] / LOG2E).astype(q.dtype)
  return out if out_shape4 is None else out.reshape(out_shape4)
