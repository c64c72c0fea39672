"""Absorbed-MLA decode for Hopper in Mosaic GPU (wgmma + TMA, warp specialised), split-K.

One CTA owns 64 query heads of one sequence and one split of its context; the grid is
(head blocks, splits, batch), head blocks fastest so the CTAs that read the same cache rows run
side by side (the second read comes from L2). Three warpgroups:

- memory (wg 2): streams `block_k`-row cache blocks with TMA through a ring of
  `max_concurrent_steps` shared-memory slots. Each block is loaded ONCE, in three parts: latent
  columns [0, r/2) and [r/2, r) (r = kv_lora_rank), and the transposed rope tile [R, block_k]
  (the cache's rope part is stored [R, rows]); the keys are all three, the values the first two.
  The stacked [L, ...] cache parts are read in place at the layer (an operand).
- score (wg 0): S = Q_lat . K_lat^T + Q_pe . rope (three wgmmas into one [64, block_k] f32
  accumulator; the rope tile is already K x N), the online
  softmax in base 2 (scale * log2(e) folded in), stores P (q.dtype) and the rescale factor in
  shared memory for its partner, then O[:, :r/2] = alpha * O + P . V[:, :r/2].
- value (wg 1): waits for P, O[:, r/2:] = alpha * O + P . V[:, r/2:].

So the value accumulator [64, r] f32 is split over two warpgroups (128 registers per thread at
r = 512) and the scores are computed once.

Multi-token queries (q [b, T, h, d], speculative verification): T is folded into the head-block
grid axis, q -> [b, T * h, d] with h a multiple of 64, so every CTA holds 64 heads of ONE token t
and runs with that token's causal length len_t = lengths[b] - (T - 1 - t) (`reference.
token_lengths`); split-K then splits each token's own blocks. The T tokens of a sequence re-read
the same cache rows, but their CTAs are adjacent in the fastest grid axis and run side by side,
so the repeated reads mostly hit L2 rather than HBM. Split s of sequence b covers blocks
[s * cps, min((s + 1) * cps, n_b)) of its own n_b = ceil(len_b / block_k) blocks (len_b: the
CTA's token length); only the last block of a sequence is masked, and there the value rows past
the length are zeroed in shared memory (stale rows, TMA fill past the end of a contiguous
cache, may hold anything, and 0 * NaN would leak). Partials (normalised O in q.dtype, base-2
log-sum-exp f32) are merged by `reference.combine_splits`; one split writes the result directly.

Paged caches: block j at position p = j * block_k comes from pool page
block_tables[b, p // page_size], rows p % page_size (block_k divides the page size); the rope
pool is [L, pages, R, page_size].

Interpret mode (CPU tests) runs the same pipeline, barriers, masking and softmax in Mosaic GPU's
interpreter, whose wgmma takes neither transposed nor register operands: there both products are
plain dots of the shared-memory tiles, and register layouts are not given.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from dsv3_jax.kernels_pallas.mosaic_common import (interpret_context, load_ref, named, num_sms,
                                                   opaque_zero, producer_ring)
from dsv3_jax.kernels_pallas.mla_decode.reference import combine_splits

__all__ = ["BlockSizes", "mla_decode", "unsupported_reason", "smem_bytes", "HEADS_PER_CTA"]

LOG2E = math.log2(math.e)
MASK_VALUE = -1e30
HEADS_PER_CTA = 64  # one wgmma M tile
SMEM_BYTES = 227 * 1024  # usable shared memory per CTA on H100
_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
NT = (((1,), (1,)), ((), ()))
NN = (((1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """block_k: cache rows per pipeline step (multiple of 64; paged: divides the page size).
  max_concurrent_steps: cache blocks in flight (shared-memory ring slots, >= 2).
  num_splits: split-K factor (None: enough CTAs to fill the SMs once)."""

  block_k: int = 64
  max_concurrent_steps: int = 2
  num_splits: int | None = None

  def __post_init__(self):
    if self.block_k <= 0 or self.block_k % 64:
      raise ValueError(f"block_k={self.block_k} must be a positive multiple of 64")
    if self.max_concurrent_steps < 2:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 2")


# Without this CompilerParams field Mosaic GPU reserves 2 KiB of reduction scratch per kernel.
_HAS_SCRATCH_PARAM = "reduction_scratch_bytes" in {
    f.name for f in dataclasses.fields(plgpu.CompilerParams)}


def smem_bytes(d: int, itemsize: int, blocks: BlockSizes) -> int:
  """Shared memory the kernel allocates (barriers and alignment excluded)."""
  bk, st = blocks.block_k, blocks.max_concurrent_steps
  return (HEADS_PER_CTA * d + st * bk * d + HEADS_PER_CTA * bk) * itemsize \
      + 2 * HEADS_PER_CTA * 4 + (0 if _HAS_SCRATCH_PARAM else 2048 + 128)


def unsupported_reason(q, latent, rope, block_tables, blocks: BlockSizes | None = None
                       ) -> str | None:
  """Why the Mosaic GPU kernel cannot take these inputs (None when it can). q: [b, h, d], or
  [b, T, h, d] (multi-token queries, any T: h a multiple of 64 keeps each CTA in one token);
  latent [..., rows, C], rope [..., R, rows] (pages of `rows` with block tables)."""
  blocks = blocks or BlockSizes()
  h, d = q.shape[-2], q.shape[-1]
  rank = latent.shape[-1]
  if jnp.dtype(q.dtype) not in _DTYPES or latent.dtype != q.dtype or rope.dtype != q.dtype:
    return (f"wgmma takes bf16/f16 operands of one dtype here, got {q.dtype}, {latent.dtype}, "
            f"{rope.dtype}")
  if h % HEADS_PER_CTA:
    return f"heads={h} must be a multiple of {HEADS_PER_CTA} (one wgmma M tile per CTA)"
  if rank % 128 or (d - rank) % 64 or d == rank:
    return (f"latent dims {rank} must be a multiple of 128 and rope dims {d - rank} a positive "
            f"multiple of 64 (128-byte swizzled column parts)")
  if block_tables is not None and latent.shape[-2] % blocks.block_k:
    return f"page size {latent.shape[-2]} must be a multiple of block_k={blocks.block_k}"
  need = smem_bytes(d, q.dtype.itemsize, blocks)
  if need > SMEM_BYTES:
    return (f"{blocks} needs ~{need} bytes of shared memory (> {SMEM_BYTES}); lower block_k or "
            f"max_concurrent_steps")
  return None


_LAYOUTS = {"tile": plgpu.Layout.WGMMA, "row": plgpu.Layout.WGMMA.reduce(1),
            "col": plgpu.Layout.WGMMA.reduce(0)}


def _kernel(len_ref, layer_ref, bt_ref, q_ref, lat_ref, rope_ref, o_ref, lse_ref, q_smems,
            k_smems, p_smem, vec_smem, barriers, *, scale: float, parts, bk: int, stages: int,
            splits: int, page: int | None, tokens: int, hb_per_token: int, interpret: bool):
  q_bar, k_bar, p_bar, p_free, done = barriers
  nh = HEADS_PER_CTA
  half = parts[0][1]
  dtype = q_ref.dtype
  lay = (lambda name: None) if interpret else (lambda name: _LAYOUTS[name])

  batch = lax.axis_index("batch")
  hb = lax.axis_index("heads")
  split = lax.axis_index("splits")
  wg = lax.axis_index("wg")
  heads = pl.ds(hb * nh, nh)
  length = len_ref[batch]
  if tokens > 1:  # head block hb holds token hb // hb_per_token: its causal length
    token = lax.div(hb, hb_per_token)
    length = jnp.maximum(length - (tokens - 1 - token), 0)
  n = lax.div(length + bk - 1, bk)
  cps = lax.div(n + splits - 1, splits)
  c0 = jnp.minimum(split * cps, n)
  c1 = jnp.minimum(c0 + cps, n)
  nblk = c1 - c0
  n_full = jnp.clip(lax.div(length, bk), c0, c1) - c0  # blocks [0, n_full) need no mask

  def zero_rows_past_end(v_smem, j):
    """Zeroes the value rows at or past `length` of relative block j in shared memory."""
    # A 1-d row iota broadcast (an iota in the tile layout would be [bk, C/2] int32 registers).
    rows = plgpu.broadcasted_iota(jnp.int32, (bk,), 0, layout=lay("row")) + (c0 + j) * bk
    keep = lax.broadcast_in_dim(rows < length, v_smem.shape, [0])
    v = v_smem[...]
    v_smem[...] = jnp.where(keep, v, jnp.zeros_like(v))

  def pv(acc, v_smem, alpha):
    """alpha * acc + P . v (P from shared memory)."""
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    if interpret:  # the interpreter's wgmma: no register operands
      return acc + lax.dot_general(p_smem[...], v_smem[...], NN,
                                   preferred_element_type=jnp.float32)

    def body(acc_ref):
      plgpu.wgmma(acc_ref, p_smem, v_smem)
      plgpu.wgmma_wait(0)

    return pl.run_state(body)(plgpu.ACC.init(acc))

  def load_vec(i):
    if interpret:
      return vec_smem[i, :]
    return load_ref(vec_smem.at[i], layout=lay("row"))

  def store_out(acc, inv, o_smem, col0):
    o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[batch, split, heads, pl.ds(col0, half)])

  # Register budgets (setmaxnreg; 3 x 168 per thread in all): the score warpgroup holds its half
  # of O (128) and the [64, block_k] scores (32), the value warpgroup only its half of O, the
  # memory one addresses. Compiled for sm_90a (bench/gpu_aot.py): no spills at 256 / 224 / 24
  # with Q's descriptors kept out of registers (see `qk`) and the masked block a single step.
  @pl.when(wg == 0)
  def _score():
    plgpu.set_max_registers(256, action="increase")
    for (o, w), q_smem in zip(parts, q_smems):
      plgpu.copy_gmem_to_smem(q_ref.at[batch, heads, pl.ds(o, w)], q_smem.at[0], q_bar)
    plgpu.barrier_wait(q_bar)
    c = scale * LOG2E

    def step(j, carry, masked: bool):
      acc, m, l = carry
      slot = lax.rem(j, stages)
      plgpu.barrier_wait(k_bar.at[slot])
      # Latent tiles are [block_k, w] (K^T: transposed view), the rope tile [R, block_k].
      nums = (NT, NT, NN)
      if interpret:  # the interpreter's wgmma cannot read a transposed operand
        s = None
        for q_smem, k_smem, num in zip(q_smems, k_smems, nums):
          dot = lax.dot_general(q_smem[0], k_smem.at[slot][...], num,
                                preferred_element_type=jnp.float32)
          s = dot if s is None else s + dot
      else:
        # Q's 36 wgmma descriptors hoisted out of the loop held ~50 registers across it (the
        # score warpgroup's spills): an opaque zero index makes them loop-variant.
        zero = opaque_zero(slot)

        def qk(acc_ref):
          for q_smem, k_smem, num in zip(q_smems, k_smems, nums):
            q_smem = q_smem.at[zero]
            k = k_smem.at[slot]
            plgpu.wgmma(acc_ref, q_smem, k.transpose((1, 0)) if num is NT else k)
          return acc_ref[...]
        s = pl.run_scoped(qk, plgpu.ACC((nh, bk), jnp.float32))
      s = s * c
      if masked:
        pos = plgpu.broadcasted_iota(jnp.int32, (bk,), 0, layout=lay("col")) + (c0 + j) * bk
        keep = lax.broadcast_in_dim(pos < length, s.shape, [1])
        s = jnp.where(keep, s, -jnp.inf)  # m starts finite: masked entries give 0
      m_next = jnp.maximum(m, s.max(axis=1))
      alpha = jnp.exp2(m - m_next)
      p = jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
      l = l * alpha + p.sum(axis=1)
      pl.when(j > 0)(lambda: plgpu.barrier_wait(p_free))  # partner done with the last P
      p_smem[...] = p.astype(dtype)
      vec_smem.at[0][...] = alpha
      if masked:
        zero_rows_past_end(k_smems[0].at[slot], j)
      plgpu.commit_smem()
      plgpu.barrier_arrive(p_bar)
      acc = pv(acc, k_smems[0].at[slot], alpha)
      plgpu.barrier_arrive(done.at[slot])
      return acc, m_next, l

    carry = (jnp.full((nh, half), 0.0, jnp.float32), jnp.full((nh,), MASK_VALUE, jnp.float32),
             jnp.full((nh,), 0.0, jnp.float32))
    if not interpret:
      carry = (plgpu.layout_cast(carry[0], lay("tile")), plgpu.layout_cast(carry[1], lay("row")),
               plgpu.layout_cast(carry[2], lay("row")))
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    # At most one block is masked (the sequence's last): a conditional step, not a loop, so
    # LLVM hoists none of its (swizzled shared-memory) addresses into registers held across it.
    acc, m, l = lax.cond(nblk > n_full, functools.partial(step, n_full, masked=True),
                         lambda c: c, carry)
    pl.when(nblk > 0)(lambda: plgpu.barrier_wait(p_free))
    seen = l > 0.0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    vec_smem.at[1][...] = inv
    log_l = jnp.log(jnp.where(seen, l, 1.0)) * (1.0 / math.log(2.0))
    vec_smem.at[0][...] = jnp.where(seen, m + log_l, -jnp.inf)  # alpha's row is free now
    plgpu.commit_smem()
    plgpu.barrier_arrive(p_bar)  # the partner's final phase: 1 / l is ready
    store_out(acc, inv, q_smems[0].at[0], 0)  # Q is dead: its first part holds the output tile
    plgpu.copy_smem_to_gmem(vec_smem.at[0], lse_ref.at[batch, split, heads])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 1)
  def _value():
    plgpu.set_max_registers(224, action="increase")

    def step(j, acc, masked: bool):
      slot = lax.rem(j, stages)
      plgpu.barrier_wait(k_bar.at[slot])
      plgpu.barrier_wait(p_bar)
      alpha = load_vec(0)
      if masked:
        zero_rows_past_end(k_smems[1].at[slot], j)
        plgpu.commit_smem()
      acc = pv(acc, k_smems[1].at[slot], alpha)
      plgpu.barrier_arrive(p_free)
      plgpu.barrier_arrive(done.at[slot])
      return acc

    acc = jnp.full((nh, half), 0.0, jnp.float32)
    if not interpret:
      acc = plgpu.layout_cast(acc, lay("tile"))
    acc = lax.fori_loop(0, n_full, functools.partial(step, masked=False), acc)
    acc = lax.cond(nblk > n_full, functools.partial(step, n_full, masked=True), lambda a: a, acc)
    plgpu.barrier_wait(p_bar)
    store_out(acc, load_vec(1), q_smems[1].at[0], half)  # the score warpgroup is done with Q
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _memory():
    plgpu.set_max_registers(24, action="decrease")

    def load(j, slot):
      pos = (c0 + j) * bk
      if page is None:
        where, rows = batch, pl.ds(pos, bk)
      else:
        where, rows = bt_ref[batch, lax.div(pos, page)], pl.ds(lax.rem(pos, page), bk)
      layer = layer_ref[0]
      srcs = [lat_ref.at[layer, where, rows, pl.ds(o, w)] for o, w in parts[:2]]
      srcs.append(rope_ref.at[layer, where, pl.ds(0, rope_ref.shape[2]), rows])
      for src, k_smem in zip(srcs, k_smems):
        plgpu.copy_gmem_to_smem(src, k_smem.at[slot], k_bar.at[slot])

    producer_ring([(lambda slot: plgpu.barrier_wait(done.at[slot]), load)], nblk, stages)


def _compiler_params():
  """approx_math; no shared-memory reduction scratch (the 2 KiB default would not fit: the row
  reductions of the WGMMA layout are warp shuffles)."""
  kw = {}
  if _HAS_SCRATCH_PARAM:
    kw["reduction_scratch_bytes"] = 0
  return plgpu.CompilerParams(approx_math=True, **kw)


def _num_splits(blocks: BlockSizes, batch: int, head_blocks: int, capacity: int) -> int:
  n_blocks = -(-capacity // blocks.block_k)
  if blocks.num_splits:
    return max(1, min(blocks.num_splits, n_blocks))
  want = -(-num_sms() // (batch * head_blocks))
  return max(1, min(want, n_blocks // 2 or 1))


def mla_decode(q, latent, rope, lengths, layer, block_tables, *, scale: float,
               block_sizes: BlockSizes | None = None, interpret: bool = False):
  """Mosaic GPU path of `mla_decode` (see the package docstring).

  q [b, h, d] -> [b, h, C], or q [b, T, h, d] -> [b, T, h, C] (token t sees cache rows
  l < lengths[b] - (T - 1 - t)); q.dtype. latent [L, b | pages, rows, C], rope
  [L, b | pages, R, rows], layer int32 [1]. Callers check `unsupported_reason` first (the
  dispatcher falls back to Triton).
  """
  blocks = block_sizes or BlockSizes()
  reason = unsupported_reason(q, latent, rope, block_tables, blocks)
  if reason is not None:
    raise ValueError(f"Mosaic GPU MLA decode cannot take these inputs: {reason}")
  kv_lora_rank = latent.shape[-1]
  out_shape = q.shape[:-1] + (kv_lora_rank,)
  b, d = q.shape[0], q.shape[-1]
  tokens = q.shape[1] if q.ndim == 4 else 1
  hb_per_token = q.shape[-2] // HEADS_PER_CTA
  q = q.reshape(b, tokens * q.shape[-2], d)  # token-major rows: CTA hb holds one token
  h = q.shape[1]
  rank, bk, stages = kv_lora_rank, blocks.block_k, blocks.max_concurrent_steps
  half = rank // 2
  parts = ((0, half), (half, half), (rank, d - rank))
  paged = block_tables is not None
  if paged:
    page = latent.shape[2]
    capacity = block_tables.shape[1] * page
    tables = block_tables.astype(jnp.int32)
  else:
    page = None
    if latent.shape[2] < bk:  # a TMA box may not exceed the array: pad a tiny cache
      extra = bk - latent.shape[2]
      latent = jnp.pad(latent, ((0, 0), (0, 0), (0, extra), (0, 0)))
      rope = jnp.pad(rope, ((0, 0), (0, 0), (0, 0), (0, extra)))
    capacity = latent.shape[2]
    tables = jnp.zeros((b, 1), jnp.int32)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, capacity)
  n_hb = h // HEADS_PER_CTA
  splits = _num_splits(blocks, b, n_hb, capacity)

  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  smem = lambda shape: plgpu.SMEM(shape, q.dtype, transforms=(tiling, swizzle))
  # Q parts [1, 64, w]: indexed by an opaque zero in the loop (see `qk` in the kernel).
  q_smems = tuple(smem((1, HEADS_PER_CTA, w)) for _, w in parts)
  k_smems = tuple(smem((stages, bk, w)) for _, w in parts[:2]) + (smem((stages, d - rank, bk)),)
  p_smem = smem((HEADS_PER_CTA, bk))
  vec_smem = plgpu.SMEM((2, HEADS_PER_CTA), jnp.float32)  # alpha (then base-2 lse), 1 / l
  barriers = (
      plgpu.Barrier(num_arrivals=len(parts)),  # q loaded
      plgpu.Barrier(num_arrivals=len(parts), num_barriers=stages),  # cache block loaded
      plgpu.Barrier(num_arrivals=1),  # P and alpha (then 1 / l) ready for the value warpgroup
      plgpu.Barrier(num_arrivals=1),  # value warpgroup done with P
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # cache slot consumed
  )
  kernel = plgpu.kernel(
      named(_kernel, "mla_decode", scale=float(scale), parts=parts, bk=bk, stages=stages,
            splits=splits, page=page, tokens=tokens, hb_per_token=hb_per_token,
            interpret=interpret),
      out_type=(jax.ShapeDtypeStruct((b, splits, h, rank), q.dtype),
                jax.ShapeDtypeStruct((b, splits, h), jnp.float32)),
      scratch_types=(q_smems, k_smems, p_smem, vec_smem, barriers),
      grid=(n_hb, splits, b),
      grid_names=("heads", "splits", "batch"),
      num_threads=3,
      thread_name="wg",
      compiler_params=_compiler_params(),
  )
  with interpret_context(interpret):
    o, lse = kernel(lengths, layer, tables, q, latent, rope)
  if splits == 1:
    return o[:, 0].reshape(out_shape)
  return combine_splits(o, lse * (1.0 / LOG2E)).astype(q.dtype).reshape(out_shape)
