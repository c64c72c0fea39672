"""Absorbed-MLA decode, GPU Pallas (Triton lowering), split-K, contiguous or paged latent cache.

Grid (head blocks, splits, batch): the head-block axis varies fastest, so the programs that share
a cache range run side by side and the 2nd..nth read of each cache tile comes from L2. Each
program walks its split of the cache in `block_k`-row chunks, computing q.c over the latent part
and q_pe.k_pe over the rope part as separate power-of-two dots (512 + 64; the rope part is stored
transposed, [R, rows], so its tiles are (R chunk, block_k) and the dot is q_pe x tile), and
accumulates softmax . c in float32 registers. The stacked [L, ...] cache parts are passed whole
and indexed at the layer (an operand), so a scanned decoder's per-layer slice is never copied
(Pallas switches to 64-bit offsets for arrays over 4 GiB).

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


def _kernel(len_ref, layer_ref, *refs, scale: float, rank: int, bk: int, splits: int,
            page: int | None, capacity: int, heads: int, tokens: int):
  if page is not None:
    bt_ref, q_ref, lat_ref, rope_ref, *out_refs = refs
  else:
    (q_ref, lat_ref, rope_ref, *out_refs), bt_ref = refs, None
  lat_chunks = pow2_chunks(rank)
  pe_chunks = pow2_chunks(rope_ref.shape[2])
  s = pl.program_id(1)
  seq = pl.program_id(2)
  layer = layer_ref[0]
  length = len_ref[0]
  n = lax.div(length + bk - 1, bk)
  cps = lax.div(n + splits - 1, splits)
  c0 = s * cps
  c1 = jnp.minimum(c0 + cps, n)
  min_len = jnp.maximum(length - (tokens - 1), 0)  # the shortest row length
  c_mid = jnp.clip(lax.div(min_len, bk), c0, jnp.maximum(c1, c0))  # chunks below need no mask
  q_lat = [q_ref[:, pl.ds(o, w)] for o, w in lat_chunks]
  q_pe = [q_ref[:, pl.ds(rank + o, w)] for o, w in pe_chunks]
  bh = q_ref.shape[0]
  row_len = None if tokens == 1 else _row_lengths(length, pl.program_id(0) * bh, bh, heads,
                                                   tokens)
  qk_scale = scale * LOG2E

  def load(c):
    """Chunk c of this sequence -> (latent tiles (bk, w), rope tiles (w, bk), absolute position
    of tile row 0)."""
    if page is None:
      start = jnp.minimum(c * bk, capacity - bk)
      where, rows = seq, pl.ds(start, bk)
    else:
      start = c * bk
      where = bt_ref[lax.div(start, page)]
      rows = pl.ds(pl.multiple_of(lax.rem(start, page), bk), bk)
    lat = [lat_ref[layer, where, rows, pl.ds(o, w)] for o, w in lat_chunks]
    pe = [rope_ref[layer, where, pl.ds(o, w), rows] for o, w in pe_chunks]
    return lat, pe, start

  def body(c, carry, masked: bool):
    accs, m, l = carry
    lat, pe, start = load(c)
    sc = None
    for qc, kc in zip(q_lat, lat):
      dot = lax.dot_general(qc, kc, NT, preferred_element_type=jnp.float32)
      sc = dot if sc is None else sc + dot
    for qc, kc in zip(q_pe, pe):
      sc += lax.dot_general(qc, kc, NN, preferred_element_type=jnp.float32)
    sc = sc * qk_scale  # (block_h, bk)
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


def mla_decode(q, latent, rope, lengths, layer, block_tables, *, scale: float,
               block_sizes: BlockSizes | None = None, interpret: bool = False):
  """GPU kernel path of `mla_decode` (see the package docstring): q [b, h, d] or [b, T, h, d]
  (token t sees lengths[b] - (T - 1 - t) rows); latent [L, b | pages, rows, C], rope
  [L, b | pages, R, rows]; layer int32 [1]. Returns [b, h, C] / [b, T, h, C] q.dtype."""
  blocks = block_sizes or BlockSizes()
  for name in ("block_k", "block_h"):
    x = getattr(blocks, name)
    if x < 16 or x & (x - 1):
      raise ValueError(f"GPU {name} must be a power of two >= 16; got {x}")
  rank = latent.shape[-1]
  out_shape4 = q.shape[:-1] + (rank,) if q.ndim == 4 else None
  tokens, heads = (q.shape[1], q.shape[2]) if q.ndim == 4 else (1, q.shape[1])
  q = q.reshape(q.shape[0], tokens * heads, q.shape[-1])  # rows = T * h, token-major
  b, h, d = q.shape
  if rank % 16 or (d - rank) % 16:
    raise ValueError(f"the GPU kernel needs latent and rope dims that are multiples of 16; got "
                     f"{rank} and {d - rank}")
  bh = min(blocks.block_h, max(16, pl.next_power_of_2(h)))
  hp = round_up(h, bh)
  q = pad_to(q, 1, hp)
  nh = hp // bh
  paged = block_tables is not None
  if paged:
    page = latent.shape[2]
    if page & (page - 1):
      raise ValueError(f"the GPU kernel needs a power-of-two page size; got {page}")
    bk = min(blocks.block_k, page)
    if bk < 16:
      raise ValueError(f"page size {page} is below the Triton dot minimum of 16")
    capacity = block_tables.shape[1] * page
  else:
    page = None
    if latent.shape[2] < 16:  # a few rows: cheaper than a special case
      latent, rope = pad_to(latent, 2, 16), pad_to(rope, 3, 16)
    capacity = latent.shape[2]
    bk = min(blocks.block_k, 1 << (capacity.bit_length() - 1))  # <= capacity
  n_chunks = -(-capacity // bk)
  splits = blocks.num_splits or max(1, min(-(-_TARGET_PROGRAMS // (nh * b)), n_chunks // 4))
  splits = max(1, min(splits, n_chunks))
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, capacity)

  whole = lambda x: pl.BlockSpec(x.shape, lambda hb, s, b_: (0,) * x.ndim)  # noqa: E731
  in_specs = [pl.BlockSpec((1,), lambda hb, s, b_: (b_,)), whole(layer)]
  args = [lengths, layer]
  if paged:
    in_specs.append(pl.BlockSpec((None, block_tables.shape[1]), lambda hb, s, b_: (b_, 0)))
    args.append(block_tables.astype(jnp.int32))
  # The stacked cache parts whole: the kernel indexes [layer, sequence | page, ...] itself.
  in_specs += [pl.BlockSpec((None, bh, d), lambda hb, s, b_: (b_, hb, 0)), whole(latent),
               whole(rope)]
  args += [q, latent, rope]
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
