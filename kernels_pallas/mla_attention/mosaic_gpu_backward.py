"""MLA attention backward for Hopper in Mosaic GPU (wgmma, TMA, warp specialisation), dqk != dv.

Two kernels after an XLA preprocess delta = rowsum(dO * O) [b, h, tq] float32:
- dq: one CTA owns 2 * block_q query rows of one (head, batch); two compute warpgroups take
  block_q rows each and keep dQ in f32 registers, a memory warpgroup streams K (as its column
  parts) and V blocks through `max_concurrent_steps` shared-memory slots. Per key block:
  s = Q K^T, p = exp2(s * c - lse), dp = dO V^T, ds = p (dp - delta), dQ += ds K.
- dk/dv: one CTA owns 2 * block_k key rows of one (kv head, batch); two compute warpgroups
  (`_DKV_WGS`) take block_k rows each and keep dK [block_k, dqk] and dV [block_k, dv] in f32
  registers; the memory warpgroup streams, for each query head of the kv head's group (GQA/MQA:
  the sum over the group happens in registers), the query blocks that see the CTA's keys: Q
  parts, dO, lse, delta.
  Per query block: sT = K Q^T, pT = exp2(sT * c - lse), dV += pT dO, dpT = V dO^T,
  dsT = pT (dpT - delta), dK += dsT Q. Atomics-free: no kernel writes another's output.

Q and K are held as column parts [0, dv) and [dv, dqk) exactly as in the forward (`parts`), so
products over dqk are sums of per-part wgmmas and dQ / dK are one accumulator per part.
The log-sum-exp is the forward's: base 2 of the scores times scale * log2(e), +inf on rows that
see no key (p = 0 there, so those rows get zero gradients). Masking follows `reference.py`
(causal with per-batch q_offset, key padding, segment ids) with `kv_block_range` /
`q_block_range` deciding which blocks are skipped, masked or fully visible (segment ids alone,
without positions, outside the causal-diagonal and padded blocks).

Interpret mode (CPU) runs the same pipelines and barriers, with plain dots of the shared-memory
tiles in place of wgmma (the interpreter takes neither transposed nor register operands).
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

from dsv3_jax.kernels_pallas.mosaic_common import (interpret_params, load_ref, named, opaque_zero,
                                                   producer_ring)
from dsv3_jax.kernels_pallas.mla_attention.reference import (NN, NT, KernelConfig, kv_block_range,
                                                             q_block_range)

__all__ = ["BackwardBlockSizes", "backward", "smem_bytes", "unsupported_reason"]

LOG2E = math.log2(math.e)
# Compute warpgroups of the dk/dv kernel. dK and dV hold 160 f32 registers per thread at
# DeepSeek-V3 dims (192 + 128); with K's and V's wgmma descriptors kept out of registers across
# the loop (`opaque_zero`) and the position iotas confined to the causal-diagonal / padded
# blocks (`_dkv_kernel`'s `mask`), two compute warpgroups at setmaxnreg 240 (the memory one at
# 24: 2 * 240 + 24 = 3 * 168, the launch allocation) compile for sm_90a without spills, with
# segment ids too (bench/RESULTS.md "GPU AOT"). Two rather than one: one warpgroup's
# softmax-side work overlaps the other's wgmmas, and each streamed Q / dO block serves
# 2 * block_k keys. The dq kernel has two as well (96 accumulator registers).
_DKV_WGS = 2
_LAYOUTS = {"tile": plgpu.Layout.WGMMA, "row": plgpu.Layout.WGMMA.reduce(1),
            "col": plgpu.Layout.WGMMA.reduce(0)}


@dataclasses.dataclass(frozen=True)
class BackwardBlockSizes:
  """Tiles of the Mosaic GPU backward (all multiples of 64).

  block_q_dq / block_k_dq: query rows per compute warpgroup (a CTA covers 2 * block_q_dq) and
    key rows per pipeline step of the dq kernel.
  block_q_dkv / block_k_dkv: query rows per pipeline step and key rows per compute warpgroup
    (a CTA covers _DKV_WGS * block_k_dkv) of the dk/dv kernel.
  max_concurrent_steps: shared-memory slots of the streamed operands (>= 2).
  """

  block_q_dq: int = 64
  block_k_dq: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  max_concurrent_steps: int = 2

  def __post_init__(self):
    for name in ("block_q_dq", "block_k_dq", "block_q_dkv", "block_k_dkv"):
      val = getattr(self, name)
      if val <= 0 or val % 64:
        raise ValueError(f"{name}={val} must be a positive multiple of 64")
    if self.max_concurrent_steps < 2:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 2")


def smem_bytes(dqk: int, dv: int, itemsize: int, blocks: BackwardBlockSizes,
               has_segments: bool) -> int:
  """Shared memory of the larger of the two kernels (approximate: barriers excluded)."""
  st = blocks.max_concurrent_steps
  bq, bk = blocks.block_q_dq, blocks.block_k_dq
  dq = 2 * bq * (dqk + dv) * itemsize + 4 * bq * 4 + st * bk * (dqk + dv) * itemsize
  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
  dkv = _DKV_WGS * bk * (dqk + dv) * itemsize + st * bq * (dqk + dv) * itemsize + 2 * st * bq * 4
  if has_segments:
    dq += 2 * blocks.block_q_dq * 4 + st * blocks.block_k_dq * 4
    dkv += _DKV_WGS * bk * 4 + st * bq * 4
  return max(dq, dkv)


def unsupported_reason(dqk: int, dv: int, itemsize: int, blocks: BackwardBlockSizes,
                       has_segments: bool, smem_limit: int) -> str | None:
  """Why the Mosaic GPU backward cannot run (None when it can); the caller then uses Triton."""
  need = smem_bytes(dqk, dv, itemsize, blocks, has_segments)
  if need > smem_limit:
    return (f"{blocks} needs ~{need} bytes of shared memory (> {smem_limit}); lower the "
            f"backward tiles or max_concurrent_steps")
  return None


class _Ops:
  """Products and register helpers, as wgmma on the GPU and plain dots in interpret mode."""

  def __init__(self, interpret: bool):
    self.interpret = interpret

  def lay(self, name):
    return None if self.interpret else _LAYOUTS[name]

  def cast(self, x, name):
    return x if self.interpret else plgpu.layout_cast(x, _LAYOUTS[name])

  def zeros(self, shape):
    return self.cast(jnp.zeros(shape, jnp.float32), "tile")

  def load_row(self, ref, i, name):
    """Row i of a 2-d smem ref as a 1-d value in the register layout `name`."""
    if self.interpret:
      return ref[i, :]
    return load_ref(ref.at[i], layout=_LAYOUTS[name])

  def dot_nt(self, pairs, shape):
    """sum over (a, b) in pairs of a @ b.T, a/b smem refs -> f32 [shape]."""
    if self.interpret:
      out = None
      for a, b in pairs:
        d = lax.dot_general(a[...], b[...], NT, preferred_element_type=jnp.float32)
        out = d if out is None else out + d
      return out

    def body(acc_ref):
      for a, b in pairs:
        plgpu.wgmma(acc_ref, a, b.transpose((1, 0)))
      return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))

  def accumulate(self, accs, lhs, rhs_refs, extra_nt=None):
    """accs[i] += lhs @ rhs_refs[i] (lhs in registers); with extra_nt = (a, b, shape) also
    returns a @ b.T from the same wgmma group (one wait for both)."""
    if self.interpret:
      out = tuple(acc + lax.dot_general(lhs, r[...], NN, preferred_element_type=jnp.float32)
                  for acc, r in zip(accs, rhs_refs))
      if extra_nt is None:
        return out
      a, b, shape = extra_nt
      return out, self.dot_nt([(a, b)], shape)

    n = len(accs)

    def body(refs):
      for acc_ref, r in zip(refs[:n], rhs_refs):
        plgpu.wgmma(acc_ref, lhs, r)
      if extra_nt is not None:
        plgpu.wgmma(refs[n], extra_nt[0], extra_nt[1].transpose((1, 0)))

    init = [plgpu.ACC.init(a) for a in accs]
    if extra_nt is not None:
      init.append(plgpu.ACC.init(self.zeros(extra_nt[2])))
    res = pl.run_state(body)(tuple(init))
    return tuple(res) if extra_nt is None else (tuple(res[:n]), res[n])


def _iota(ops, shape, dim: int):
  """int32 iota along `dim` of a 2-d tile, built as a broadcast 1-d iota (its row / column
  layout): a [64, 64] iota in the tile layout holds 32 registers per thread, and two of them
  next to dK and dV (160 registers) made the dk/dv kernel spill (bench/gpu_aot.py)."""
  line = plgpu.broadcasted_iota(jnp.int32, (shape[dim],), 0,
                                layout=ops.lay("col" if dim == 1 else "row"))
  return lax.broadcast_in_dim(line, shape, [dim])


def _visible(ops, shape, q_dim: int, q_start, k_start, cfg: KernelConfig, q_seg=None,
             kv_seg=None):
  """Visibility of a tile whose query index runs along dim `q_dim` (0: [bq, bk], 1: [bk, bq]).

  q_seg / kv_seg: segment ids already broadcast to `shape`."""
  q_pos = _iota(ops, shape, q_dim) + q_start
  k_pos = _iota(ops, shape, 1 - q_dim) + k_start
  vis = None
  if cfg.causal:
    vis = k_pos <= q_pos
  if cfg.kv_len % shape[1 - q_dim]:
    pad = k_pos < cfg.kv_len
    vis = pad if vis is None else jnp.logical_and(vis, pad)
  if cfg.has_segments:
    same = q_seg == kv_seg
    vis = same if vis is None else jnp.logical_and(vis, same)
  return vis


def _dq_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               cfg: KernelConfig, parts, nk: int, nqt: int, g: int):
  blocks: BackwardBlockSizes = cfg.blocks
  bq, bk, stages = blocks.block_q_dq, blocks.block_k_dq, blocks.max_concurrent_steps
  if cfg.has_segments:
    q_seg_ref, kv_seg_ref, *refs = refs
  dq_ref, q_smems, do_smem, lse_smem, delta_smem, k_smems, v_smem, seg_smems, barriers = refs
  q_bar, kv_bar, kv_done = barriers
  ops = _Ops(cfg.interpret)
  dtype = q_ref.dtype
  batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  tile = nqt - 1 - lax.axis_index("q_seq")  # heaviest causal tiles first
  off = off_ref[batch]
  range_kw = dict(block_q=bq, block_k=bk, num_k_blocks=nk, kv_len=cfg.kv_len, causal=cfg.causal,
                  has_segments=cfg.has_segments)

  def cta_steps():  # key blocks streamed: those the CTA's last query row sees
    # Evaluated where needed, from a fresh read of off_ref (not held across the compute loops).
    return kv_block_range(off_ref[batch] + tile * 2 * bq + bq, **range_kw)[1]

  @pl.when(wg < 2)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    row0 = tile * 2 * bq + wg * bq
    q_start = off + row0
    # [0, n_full): with segment ids only the segment mask, else none; [n_full, n_end): blocks
    # cut by the causal diagonal or holding key padding (positions needed), as in the dk/dv kernel.
    n_full, n_end = kv_block_range(q_start, **dict(range_kw, has_segments=False))
    rows = pl.ds(row0, bq)
    for (o, w), q_smem in zip(parts, q_smems):
      plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head, pl.ds(o, w)], q_smem.at[wg],
                              q_bar.at[wg])
    plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[wg], q_bar.at[wg])
    plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[wg], q_bar.at[wg])
    plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[wg], q_bar.at[wg])
    if cfg.has_segments:
      plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, rows], seg_smems[0].at[wg], q_bar.at[wg])
    plgpu.barrier_wait(q_bar.at[wg])
    c = cfg.scale * LOG2E
    lse = lax.broadcast_in_dim(ops.load_row(lse_smem, wg, "row"), (bq, bk), [0])
    delta = lax.broadcast_in_dim(ops.load_row(delta_smem, wg, "row"), (bq, bk), [0])
    q_seg = None
    if cfg.has_segments:
      q_seg = lax.broadcast_in_dim(ops.load_row(seg_smems[0], wg, "row"), (bq, bk), [0])

    def step(j, accs, mask: str | None):  # mask: None, "segments" or "all"
      slot = lax.rem(j, stages)
      plgpu.barrier_wait(kv_bar.at[slot])
      s = ops.dot_nt([(q.at[wg], k.at[slot]) for q, k in zip(q_smems, k_smems)], (bq, bk))
      p = jnp.exp2(s * c - lse)  # 0 on rows with lse = +inf
      if mask is not None:  # a select on p, as in the dk/dv kernel
        kv_seg = None
        if cfg.has_segments:
          kv_seg = lax.broadcast_in_dim(ops.load_row(seg_smems[1], slot, "col"), (bq, bk), [1])
        if mask == "segments":
          vis = q_seg == kv_seg
        else:
          vis = _visible(ops, (bq, bk), 0, q_start, j * bk, cfg, q_seg, kv_seg)
        p = jnp.where(vis, p, jnp.zeros_like(p))
      dp = ops.dot_nt([(do_smem.at[wg], v_smem.at[slot])], (bq, bk))
      ds = (p * (dp - delta)).astype(dtype)
      accs = ops.accumulate(accs, ds, [k.at[slot] for k in k_smems])
      plgpu.barrier_arrive(kv_done.at[slot])
      return accs

    def drain(j, _):  # blocks only the other warpgroup needs: observe and release them
      slot = lax.rem(j, stages)
      plgpu.barrier_wait(kv_bar.at[slot])
      plgpu.barrier_arrive(kv_done.at[slot])

    accs = tuple(ops.zeros((bq, w)) for _, w in parts)
    rest = "segments" if cfg.has_segments else None
    accs = lax.fori_loop(0, n_full, functools.partial(step, mask=rest), accs)
    if cfg.causal or cfg.kv_len % bk:
      accs = lax.fori_loop(n_full, n_end, functools.partial(step, mask="all"), accs)
    lax.fori_loop(n_end, cta_steps(), drain, None)
    for acc, q_smem in zip(accs, q_smems):
      q_smem.at[wg][...] = (acc * cfg.scale).astype(dtype)
    plgpu.commit_smem()
    for (o, w), q_smem in zip(parts, q_smems):
      plgpu.copy_smem_to_gmem(q_smem.at[wg], dq_ref.at[batch, rows, head, pl.ds(o, w)])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(head, g)

    def load(j, slot):
      keys = pl.ds(j * bk, bk)
      for (o, w), k_smem in zip(parts, k_smems):
        plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head, pl.ds(o, w)], k_smem.at[slot],
                                kv_bar.at[slot])
      plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_smem.at[slot], kv_bar.at[slot])
      if cfg.has_segments:
        plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, keys], seg_smems[1].at[slot],
                                kv_bar.at[slot])

    producer_ring([(lambda slot: plgpu.barrier_wait(kv_done.at[slot]), load)], cta_steps(), stages,
                  static_steps=k_ref.shape[1] // bk)


def _dkv_kernel(off_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                cfg: KernelConfig, parts, nq: int, g: int):
  blocks: BackwardBlockSizes = cfg.blocks
  bq, bk, stages = blocks.block_q_dkv, blocks.block_k_dkv, blocks.max_concurrent_steps
  if cfg.has_segments:
    q_seg_ref, kv_seg_ref, *refs = refs
  (dk_ref, dv_ref, k_smems, v_smem, q_smems, do_smem, lse_smem, delta_smem, seg_smems,
   barriers) = refs
  k_bar, q_bar, q_done = barriers
  ops = _Ops(cfg.interpret)
  dtype = q_ref.dtype
  batch, kv_head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
  kt = lax.axis_index("kv_seq")
  off = off_ref[batch]
  range_kw = dict(block_q=bq, block_k=bk, num_q_blocks=nq, kv_len=cfg.kv_len, causal=cfg.causal,
                  has_segments=cfg.has_segments)
  cta_lo, _ = q_block_range(kt * _DKV_WGS * bk, off, **range_kw)  # the first warpgroup's q_lo
  n_per = nq - cta_lo  # query blocks streamed per query head of the group

  @pl.when(wg < _DKV_WGS)
  def _compute():
    if _DKV_WGS > 1:
      plgpu.set_max_registers(240, action="increase")
    row0 = kt * _DKV_WGS * bk + wg * bk
    # [q_lo, q_full): blocks cut by the causal diagonal or holding key padding (positions
    # needed); [q_full, nq): with segment ids only the segment mask (no iotas: with them live
    # across that loop too, ptxas spilled 8 bytes), else no mask.
    q_lo, q_full = q_block_range(row0, off, **dict(range_kw, has_segments=False))
    rows = pl.ds(row0, bk)
    for (o, w), k_smem in zip(parts, k_smems):
      plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, kv_head, pl.ds(o, w)], k_smem.at[wg],
                              k_bar.at[wg])
    plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, kv_head], v_smem.at[wg], k_bar.at[wg])
    if cfg.has_segments:
      plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, rows], seg_smems[0].at[wg], k_bar.at[wg])
    plgpu.barrier_wait(k_bar.at[wg])
    c = cfg.scale * LOG2E

    def step(qi, carry, base, mask: str | None):  # mask: None, "segments" or "all"
      dks, dv = carry
      slot = lax.rem(base + qi, stages)
      plgpu.barrier_wait(q_bar.at[slot])
      # K's and V's wgmma descriptors recomputed per step, not held in registers across the
      # loop (`opaque_zero`): hoisted, they made ptxas spill ~100 bytes here.
      kw = wg + opaque_zero(slot, cfg.interpret)
      st = ops.dot_nt([(k.at[kw], q.at[slot]) for k, q in zip(k_smems, q_smems)], (bk, bq))
      lse = lax.broadcast_in_dim(ops.load_row(lse_smem, slot, "col"), (bk, bq), [1])
      pt = jnp.exp2(st * c - lse).astype(dtype)  # 0 on rows with lse = +inf
      # The mask selects on pT (bf16, st's registers already free) rather than -inf into st:
      # fewer live registers while the segment ids are loaded, and st * c - lse stays one FMA.
      if mask is not None:
        q_seg = kv_seg = None
        if cfg.has_segments:  # re-read from shared memory: nothing held across steps
          q_seg = lax.broadcast_in_dim(ops.load_row(seg_smems[1], slot, "col"), (bk, bq), [1])
          kv_seg = lax.broadcast_in_dim(ops.load_row(seg_smems[0], wg, "row"), (bk, bq), [0])
        if mask == "segments":
          vis = q_seg == kv_seg
        else:
          vis = _visible(ops, (bk, bq), 1, off + qi * bq, row0, cfg, q_seg, kv_seg)
        pt = jnp.where(vis, pt, jnp.zeros_like(pt))
      # pT kept in dtype only, dV's wgmma and then dpT's in separate groups (fewer live
      # registers than one group for both).
      (dv,) = ops.accumulate((dv,), pt, [do_smem.at[slot]])
      dpt = ops.dot_nt([(v_smem.at[kw], do_smem.at[slot])], (bk, bq))
      delta = lax.broadcast_in_dim(ops.load_row(delta_smem, slot, "col"), (bk, bq), [1])
      dst = (pt.astype(jnp.float32) * (dpt - delta)).astype(dtype)
      dks = ops.accumulate(dks, dst, [q.at[slot] for q in q_smems])
      plgpu.barrier_arrive(q_done.at[slot])
      return dks, dv

    def drain(qi, _, base):  # query blocks only the other warpgroup needs
      slot = lax.rem(base + qi, stages)
      plgpu.barrier_wait(q_bar.at[slot])
      plgpu.barrier_arrive(q_done.at[slot])

    def per_head(hi, carry):
      base = hi * n_per - cta_lo  # global step of query block qi is base + qi
      lax.fori_loop(cta_lo, q_lo, functools.partial(drain, base=base), None)
      if cfg.causal or cfg.kv_len % bk:
        carry = lax.fori_loop(q_lo, q_full, functools.partial(step, base=base, mask="all"),
                              carry)
      rest = "segments" if cfg.has_segments else None
      return lax.fori_loop(q_full, nq, functools.partial(step, base=base, mask=rest), carry)

    carry = (tuple(ops.zeros((bk, w)) for _, w in parts), ops.zeros((bk, v_ref.shape[-1])))
    dks, dv = lax.fori_loop(0, g, per_head, carry)
    for acc, k_smem in zip(dks, k_smems):
      k_smem.at[wg][...] = (acc * cfg.scale).astype(dtype)
    v_smem.at[wg][...] = dv.astype(dtype)
    plgpu.commit_smem()
    for (o, w), k_smem in zip(parts, k_smems):
      plgpu.copy_smem_to_gmem(k_smem.at[wg], dk_ref.at[batch, rows, kv_head, pl.ds(o, w)])
    plgpu.copy_smem_to_gmem(v_smem.at[wg], dv_ref.at[batch, rows, kv_head])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == _DKV_WGS)
  def _memory():
    if _DKV_WGS > 1:
      plgpu.set_max_registers(24, action="decrease")
    total = g * n_per

    def load(t, slot):
      per = jnp.maximum(n_per, 1)
      head = kv_head * g + lax.div(t, per)
      rows = pl.ds((cta_lo + lax.rem(t, per)) * bq, bq)
      for (o, w), q_smem in zip(parts, q_smems):
        plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head, pl.ds(o, w)], q_smem.at[slot],
                                q_bar.at[slot])
      plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head], do_smem.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[slot], q_bar.at[slot])
      plgpu.copy_gmem_to_smem(delta_ref.at[batch, head, rows], delta_smem.at[slot],
                              q_bar.at[slot])
      if cfg.has_segments:
        plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, rows], seg_smems[1].at[slot], q_bar.at[slot])

    producer_ring([(lambda slot: plgpu.barrier_wait(q_done.at[slot]), load)], total, stages,
                  static_steps=g * nq)


def backward(q, k, v, off, q_seg, kv_seg, o, lse, do, cfg: KernelConfig, parts):
  """Mosaic GPU backward on padded inputs -> (dq, dk, dv) in the dtypes of q, k, v.

  q [b, tq, h, dqk], k [b, tk, hk, dqk], v [b, tk, hk, dv], o/do [b, tq, h, dv]; off int32 [b];
  q_seg/kv_seg int32 [b, tq]/[b, tk] or None; lse: the forward's base-2 log-sum-exp [b, h, tq]
  float32 (+inf on rows with no visible key). cfg.blocks is a `BackwardBlockSizes`; tq must be
  a multiple of 2 * block_q_dq and of block_q_dkv, tk of block_k_dq and of block_k_dkv.
  parts: the (offset, width) column parts of q/k (the forward's).
  """
  blocks: BackwardBlockSizes = cfg.blocks
  b, tq, h, dqk = q.shape
  tk, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
  g = h // hk
  stages = blocks.max_concurrent_steps
  for name, n, m in (("q_len", tq, 2 * blocks.block_q_dq), ("q_len", tq, blocks.block_q_dkv),
                     ("kv_len", tk, blocks.block_k_dq),
                     ("kv_len", tk, _DKV_WGS * blocks.block_k_dkv)):
    if n % m:
      raise ValueError(f"padded {name} {n} must be a multiple of {m} ({blocks})")
  delta = jnp.einsum("bthe,bthe->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  smem = lambda shape, dt: plgpu.SMEM(shape, dt, transforms=(tiling, swizzle))
  f32 = lambda shape: plgpu.SMEM(shape, jnp.float32)
  kw = {"interpret": interpret_params()} if cfg.interpret else {}
  extra = 1 if cfg.has_segments else 0
  seg_args = [q_seg, kv_seg] if cfg.has_segments else []
  common = dict(num_threads=3, thread_name="wg",
                compiler_params=plgpu.CompilerParams(approx_math=True), **kw)

  bq, bk = blocks.block_q_dq, blocks.block_k_dq
  nqt = tq // (2 * bq)
  seg_smems = None
  if cfg.has_segments:
    seg_smems = (plgpu.SMEM((2, bq), jnp.int32), plgpu.SMEM((stages, bk), jnp.int32))
  dq = plgpu.kernel(
      named(_dq_kernel, "mla_attention_dq", cfg=cfg, parts=parts, nk=pl.cdiv(cfg.kv_len, bk),
            nqt=nqt, g=g),
      out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_types=(
          tuple(smem((2, bq, w), q.dtype) for _, w in parts), smem((2, bq, dv), do.dtype),
          f32((2, bq)), f32((2, bq)),
          tuple(smem((stages, bk, w), k.dtype) for _, w in parts), smem((stages, bk, dv), v.dtype),
          seg_smems,
          (plgpu.Barrier(num_arrivals=len(parts) + 3 + extra, num_barriers=2),  # q, do, lse, delta
           plgpu.Barrier(num_arrivals=len(parts) + 1 + extra, num_barriers=stages),  # k, v
           plgpu.Barrier(num_arrivals=2, num_barriers=stages))),  # k/v slot consumed
      grid=(h, nqt, b), grid_names=("heads", "q_seq", "batch"), **common,
  )(off, q, k, v, do, lse, delta, *seg_args)

  bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
  nkt = tk // (_DKV_WGS * bk)
  seg_smems = None
  if cfg.has_segments:
    seg_smems = (plgpu.SMEM((_DKV_WGS, bk), jnp.int32), plgpu.SMEM((stages, bq), jnp.int32))
  dk, dv_ = plgpu.kernel(
      named(_dkv_kernel, "mla_attention_dkv", cfg=cfg, parts=parts, nq=tq // bq, g=g),
      out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
      scratch_types=(
          tuple(smem((_DKV_WGS, bk, w), k.dtype) for _, w in parts),
          smem((_DKV_WGS, bk, dv), v.dtype),
          tuple(smem((stages, bq, w), q.dtype) for _, w in parts),
          smem((stages, bq, dv), do.dtype), f32((stages, bq)), f32((stages, bq)), seg_smems,
          (plgpu.Barrier(num_arrivals=len(parts) + 1 + extra, num_barriers=_DKV_WGS),  # k, v
           plgpu.Barrier(num_arrivals=len(parts) + 3 + extra, num_barriers=stages),  # q side
           plgpu.Barrier(num_arrivals=_DKV_WGS, num_barriers=stages))),  # q slot consumed
      grid=(hk, nkt, b), grid_names=("heads", "kv_seq", "batch"),
      **dict(common, num_threads=_DKV_WGS + 1),
  )(off, q, k, v, do, lse, delta, *seg_args)
  return dq, dk, dv_
