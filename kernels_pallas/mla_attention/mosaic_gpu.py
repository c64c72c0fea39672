"""MLA attention forward for Hopper in Mosaic GPU (wgmma, TMA, warp specialisation), dqk != dv.

One CTA owns 2 * block_q query rows of one (head, batch): two compute warpgroups take block_q rows
each, a third (memory) warpgroup streams key/value blocks through a ring of
`max_concurrent_steps` shared-memory slots with TMA. K and V have their own buffers and head
dims (192 and 128 for DeepSeek-V3). Q and K are held as column parts [0, dv) and [dv, dqk)
(the nope and rope parts for DeepSeek-V3), so q.k is two wgmmas into one accumulator and the
output tile reuses the shared memory of the first Q part (saves block_q * dv * 2 bytes per
warpgroup, which is what lets block_k = 128 fit with two stages).

Softmax runs in base 2 with scale * log2(e) folded in; the saved log-sum-exp is base 2,
[batch, heads, q_len] float32, +inf on rows that see no key: exactly what the Triton backward
of `gpu.py` consumes. The custom VJP pairs this forward with the Mosaic GPU backward of
`mosaic_gpu_backward.py` (default) or with that Triton backward (`BlockSizes.backward_impl`).

Masking (same rules as `reference.py`): causal with a per-batch q_offset, key padding, segment
ids. Key blocks that are fully visible run without a mask; partly visible ones are masked;
invisible ones are skipped (the memory warpgroup loads only blocks the CTA's last row can see).
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
from dsv3_jax.kernels_pallas.mla_attention import gpu as triton_gpu
from dsv3_jax.kernels_pallas.mla_attention import mosaic_gpu_backward as mgpu_bwd
from dsv3_jax.kernels_pallas.mla_attention.mosaic_gpu_backward import BackwardBlockSizes
from dsv3_jax.kernels_pallas.mla_attention.reference import (MASK_VALUE, NN, NT, KernelConfig,
                                                             kernel_vjp, kv_block_range, may_mask,
                                                             padded_call, round_up)

__all__ = ["BlockSizes", "BackwardBlockSizes", "mla_attention", "forward", "unsupported_reason",
           "backward_choice", "SMEM_BYTES", "BACKWARD_IMPLS"]

LOG2E = math.log2(math.e)
SMEM_BYTES = 227 * 1024  # usable shared memory per CTA on H100
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
BACKWARD_IMPLS = ("mosaic", "triton")


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tiles of the Mosaic GPU forward, and which backward runs with which tiles.

  block_q: query rows per compute warpgroup (multiple of 64; a CTA covers 2 * block_q).
  block_k: key rows per pipeline step (multiple of 64).
  max_concurrent_steps: key/value shared-memory slots (>= 2).
  use_schedule_barrier: ping-pong the two compute warpgroups (one's softmax overlaps the
    other's wgmma), as in FlashAttention-3.
  pv_in_place: p @ v accumulates in place onto the rescaled output accumulator (`pl.run_state`);
    False uses a fresh accumulator and adds it.
  backward_impl: "mosaic" (the Mosaic GPU dq and dk/dv kernels, tiles `mosaic_backward`) or
    "triton" (the Triton backward of `gpu.py`, tiles `backward`). Inputs the Mosaic backward
    cannot take (see `backward_choice`) fall back to Triton.

  Interpret mode (CPU tests) runs the same pipeline, barriers, masking and softmax, but its
  wgmma takes only untransposed shared-memory operands, so there both products are plain dots
  of the shared-memory tiles: the wgmma calls themselves are exercised only on a GPU.
  """

  block_q: int = 64
  block_k: int = 128
  max_concurrent_steps: int = 2
  use_schedule_barrier: bool = True
  pv_in_place: bool = True
  backward: triton_gpu.BlockSizes = triton_gpu.BlockSizes()
  backward_impl: str = "mosaic"
  mosaic_backward: BackwardBlockSizes = BackwardBlockSizes()

  def __post_init__(self):
    if self.block_q % 64 or self.block_q <= 0:
      raise ValueError(f"block_q={self.block_q} must be a positive multiple of 64")
    if self.block_k % 64 or self.block_k <= 0:
      raise ValueError(f"block_k={self.block_k} must be a positive multiple of 64")
    if self.max_concurrent_steps < 2:
      raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be >= 2")
    if self.backward_impl not in BACKWARD_IMPLS:
      raise ValueError(f"backward_impl={self.backward_impl!r} must be one of {BACKWARD_IMPLS}")


def _parts(dqk: int, dv: int) -> tuple[tuple[int, int], ...]:
  """Column parts (offset, width) of Q and K: [0, dv) and [dv, dqk) when dv < dqk."""
  if dv < dqk:
    return ((0, dv), (dv, dqk - dv))
  return ((0, dqk),)


def smem_bytes(dqk: int, dv: int, itemsize: int, blocks: BlockSizes, has_segments: bool) -> int:
  """Shared memory the forward allocates (approximate: barriers and alignment excluded)."""
  bq, bk, st = blocks.block_q, blocks.block_k, blocks.max_concurrent_steps
  total = 2 * bq * dqk * itemsize + st * bk * (dqk + dv) * itemsize + 2 * bq * 4
  if dv > dqk:
    total += 2 * bq * dv * itemsize  # separate output tile
  if has_segments:
    total += 2 * bq * 4 + st * bk * 4
  return total


def unsupported_reason(q, k, v, *, scale: float, blocks: BlockSizes,
                       has_segments: bool) -> str | None:
  """Why the Mosaic GPU forward cannot take these inputs (None when it can)."""
  if not (q.dtype == k.dtype == v.dtype):
    return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
  if jnp.dtype(q.dtype) not in map(jnp.dtype, _SUPPORTED_DTYPES):
    return f"wgmma takes bf16/f16 operands here, got {q.dtype}"
  if q.shape[-1] % 64 or v.shape[-1] % 64:
    return f"head dims must be multiples of 64 (128-byte swizzle); got {q.shape[-1]}, {v.shape[-1]}"
  if not scale > 0:
    return f"the folded base-2 softmax needs scale > 0, got {scale}"
  need = smem_bytes(q.shape[-1], v.shape[-1], q.dtype.itemsize, blocks, has_segments)
  if need > SMEM_BYTES:
    return (f"{blocks} needs ~{need} bytes of shared memory (> {SMEM_BYTES}); lower block_k or "
            f"max_concurrent_steps")
  return None


_LAYOUTS = {"tile": plgpu.Layout.WGMMA, "row": plgpu.Layout.WGMMA.reduce(1),
            "col": plgpu.Layout.WGMMA.reduce(0)}


def _kernel(off_ref, q_ref, k_ref, v_ref, *refs, cfg: KernelConfig, parts, nk: int, nqt: int,
            g: int, sep_out: bool):
  blocks: BlockSizes = cfg.blocks
  bq, bk, stages = blocks.block_q, blocks.block_k, blocks.max_concurrent_steps
  if cfg.has_segments:
    q_seg_ref, kv_seg_ref, *refs = refs
  o_ref, lse_ref, *scratch = refs
  q_smems, k_smems, v_smem, o_sep, lse_smem, seg_smems, barriers = scratch
  q_bar, k_bar, v_bar, k_done, v_done, sched = barriers
  dv = v_ref.shape[-1]
  dtype = q_ref.dtype
  # Register layouts matter on the GPU only; interpret mode has no layout_cast and no layouts.
  lay = (lambda name: None) if cfg.interpret else (lambda name: _LAYOUTS[name])
  cast = (lambda x, name: x) if cfg.interpret else (lambda x, name: plgpu.layout_cast(x, lay(name)))

  def load(ref, i, name):  # row i of a 2-d int32 smem ref, in the register layout `name`
    if cfg.interpret:
      return ref[i, :]
    return load_ref(ref.at[i], layout=lay(name))

  batch = lax.axis_index("batch")
  head = lax.axis_index("heads")
  wg = lax.axis_index("wg")
  tile = nqt - 1 - lax.axis_index("q_seq")  # heaviest causal tiles first
  off = off_ref[batch]
  range_kw = dict(block_q=bq, block_k=bk, num_k_blocks=nk, kv_len=cfg.kv_len, causal=cfg.causal,
                  has_segments=cfg.has_segments)
  # Key blocks the CTA loads: those its last warpgroup sees (n_end grows with the row position).
  _, cta_steps = kv_block_range(off + tile * 2 * bq + bq, **range_kw)

  def schedule_barrier():
    if blocks.use_schedule_barrier:
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

  @pl.when(wg < 2)
  def _compute():
    plgpu.set_max_registers(232, action="increase")
    row0 = tile * 2 * bq + wg * bq  # padded row index of this warpgroup's first query
    q_start = off + row0
    n_full, n_end = kv_block_range(q_start, **range_kw)
    rows = pl.ds(row0, bq)
    for (o, w), q_smem in zip(parts, q_smems):
      plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head, pl.ds(o, w)], q_smem.at[wg],
                              q_bar.at[wg])
    if cfg.has_segments:
      plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, rows], seg_smems[0].at[wg], q_bar.at[wg])
    plgpu.barrier_wait(q_bar.at[wg])

    c = cfg.scale * LOG2E
    m = cast(jnp.full((bq,), MASK_VALUE, jnp.float32), "row")
    l = cast(jnp.full((bq,), 0.0, jnp.float32), "row")
    acc = cast(jnp.full((bq, dv), 0.0, jnp.float32), "tile")

    @pl.when(n_end > 0)
    def _():
      plgpu.barrier_wait(k_bar.at[0])

    pl.when(wg == 1)(schedule_barrier)

    def step(j, carry, masked: bool):
      acc, m, l = carry
      slot = lax.rem(j, stages)

      def qk(acc_ref):
        qw = wg + opaque_zero(slot)  # Q's descriptors not held across the loop (`opaque_zero`)
        for q_smem, k_smem in zip(q_smems, k_smems):
          plgpu.wgmma(acc_ref, q_smem.at[qw], k_smem.at[slot].transpose((1, 0)))
        schedule_barrier()
        return acc_ref[...]

      if cfg.interpret:  # the interpreter's wgmma cannot read a transposed smem ref
        s = None
        for q_smem, k_smem in zip(q_smems, k_smems):
          d = lax.dot_general(q_smem.at[wg][...], k_smem.at[slot][...], NT,
                              preferred_element_type=jnp.float32)
          s = d if s is None else s + d
        schedule_barrier()
      else:
        s = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
      if masked:
        vis = None
        # Positions as broadcast 1-d iotas (row / column layouts): a [bq, bk] iota in the tile
        # layout holds 32 registers per thread (the backward's spills, bench/gpu_aot.py).
        iota = lambda n, name: plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=lay(name))
        k_pos = lax.broadcast_in_dim(iota(bk, "col"), (bq, bk), [1]) + j * bk
        if cfg.causal:
          q_pos = lax.broadcast_in_dim(iota(bq, "row"), (bq, bk), [0])
          vis = k_pos <= q_pos + q_start
        if cfg.kv_len % bk:
          pad = k_pos < cfg.kv_len
          vis = pad if vis is None else jnp.logical_and(vis, pad)
        if cfg.has_segments:  # both re-read from shared memory: nothing held across steps
          q_seg = lax.broadcast_in_dim(load(seg_smems[0], wg, "row"), (bq, bk), [0])
          kv_seg = load(seg_smems[1], slot, "col")
          same = q_seg == lax.broadcast_in_dim(kv_seg, (bq, bk), [1])
          vis = same if vis is None else jnp.logical_and(vis, same)
        s = jnp.where(vis, s, -jnp.inf)  # m starts finite, so masked entries give exp2 = 0
      plgpu.barrier_arrive(k_done.at[slot])
      m_next = jnp.maximum(m, s.max(axis=1) * c)
      alpha = jnp.exp2(m - m_next)
      p = jnp.exp2(s * c - lax.broadcast_in_dim(m_next, s.shape, [0]))
      acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
      l = l * alpha + p.sum(axis=1)
      p16 = p.astype(dtype)
      if blocks.use_schedule_barrier:
        plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(v_bar.at[slot])
      if blocks.use_schedule_barrier:
        plgpu.barrier_wait(sched)

      def pv(acc_ref):
        plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
        nxt = j + 1

        @pl.when(nxt < n_end)
        def _():
          plgpu.barrier_wait(k_bar.at[lax.rem(nxt, stages)])

        if not blocks.pv_in_place:
          return acc_ref[...]

      if cfg.interpret:  # the interpreter's wgmma takes no register operand
        acc = acc + lax.dot_general(p16, v_smem.at[slot][...], NN,
                                    preferred_element_type=jnp.float32)
        pl.when(j + 1 < n_end)(lambda: plgpu.barrier_wait(k_bar.at[lax.rem(j + 1, stages)]))
      elif blocks.pv_in_place:  # wgmma accumulates onto the rescaled acc in place
        acc = pl.run_state(pv)(plgpu.ACC.init(acc))
      else:  # fresh accumulator, added afterwards
        acc = acc + pl.run_scoped(pv, plgpu.ACC((bq, dv), jnp.float32))
      plgpu.barrier_arrive(v_done.at[slot])
      return acc, m_next, l

    def drain(j, _):
      # Blocks the other warpgroup needs but this one does not: release them and keep in step
      # (every barrier phase is observed by every warpgroup that uses the barrier).
      slot = lax.rem(j, stages)
      plgpu.barrier_wait(k_bar.at[slot])
      plgpu.barrier_arrive(k_done.at[slot])
      plgpu.barrier_wait(v_bar.at[slot])
      plgpu.barrier_arrive(v_done.at[slot])
      schedule_barrier()
      schedule_barrier()
      return None

    carry = (acc, m, l)
    carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
    if may_mask(cfg, bk):
      carry = lax.fori_loop(n_full, n_end, functools.partial(step, masked=True), carry)
    acc, m, l = carry
    lax.fori_loop(n_end, cta_steps, drain, None)
    pl.when(wg == 0)(schedule_barrier)

    seen = l > 0.0
    inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
    o_smem = (o_sep if sep_out else q_smems[0]).at[wg]
    o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
    log_l = jnp.log(jnp.where(seen, l, 1.0)) * (1.0 / math.log(2.0))
    lse_smem.at[wg][...] = jnp.where(seen, m + log_l, jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_ref.at[batch, rows, head])
    plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[batch, head, rows])
    plgpu.wait_smem_to_gmem(0)

  @pl.when(wg == 2)
  def _memory():
    plgpu.set_max_registers(40, action="decrease")
    kv_head = lax.div(head, g)

    def load(step_, slot):
      keys = pl.ds(step_ * bk, bk)
      for (o, w), k_smem in zip(parts, k_smems):
        plgpu.copy_gmem_to_smem(k_ref.at[batch, keys, kv_head, pl.ds(o, w)], k_smem.at[slot],
                                k_bar.at[slot])
      if cfg.has_segments:
        plgpu.copy_gmem_to_smem(kv_seg_ref.at[batch, keys], seg_smems[1].at[slot], k_bar.at[slot])

    def load_v(step_, slot):
      plgpu.copy_gmem_to_smem(v_ref.at[batch, pl.ds(step_ * bk, bk), kv_head], v_smem.at[slot],
                              v_bar.at[slot])

    producer_ring([(lambda slot: plgpu.barrier_wait(k_done.at[slot]), load),
                   (lambda slot: plgpu.barrier_wait(v_done.at[slot]), load_v)],
                  cta_steps, stages, static_steps=k_ref.shape[1] // bk)


def forward(q, k, v, off, q_seg, kv_seg, cfg: KernelConfig):
  """Padded inputs -> (o [b, tq, h, dv], base-2 lse [b, h, tq] float32).

  q [b, tq, h, dqk] with tq a multiple of 2 * block_q; k/v [b, tk, hk, d] with tk a multiple of
  block_k; off int32 [b]; q_seg/kv_seg int32 [b, tq]/[b, tk] or None (cfg.has_segments).
  """
  blocks: BlockSizes = cfg.blocks
  b, tq, h, dqk = q.shape
  tk, hk, dv = k.shape[1], k.shape[2], v.shape[-1]
  bq, bk, stages = blocks.block_q, blocks.block_k, blocks.max_concurrent_steps
  if tq % (2 * bq) or tk % bk:
    raise ValueError(f"padded lengths {tq}, {tk} must be multiples of {2 * bq}, {bk}")
  parts = _parts(dqk, dv)
  sep_out = dv > dqk
  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  smem = lambda shape: plgpu.SMEM(shape, q.dtype, transforms=(tiling, swizzle))
  q_smems = tuple(smem((2, bq, w)) for _, w in parts)
  k_smems = tuple(smem((stages, bk, w)) for _, w in parts)
  v_smem = smem((stages, bk, dv))
  o_sep = smem((2, bq, dv)) if sep_out else None
  lse_smem = plgpu.SMEM((2, bq), jnp.float32)
  seg_smems = None
  extra = 0
  if cfg.has_segments:
    seg_smems = (plgpu.SMEM((2, bq), jnp.int32), plgpu.SMEM((stages, bk), jnp.int32))
    extra = 1
  barriers = (
      plgpu.Barrier(num_arrivals=len(parts) + extra, num_barriers=2),  # q (+ q_seg)
      plgpu.Barrier(num_arrivals=len(parts) + extra, num_barriers=stages),  # k (+ kv_seg)
      plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # v
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # k slot consumed
      plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # v slot consumed
      plgpu.Barrier(num_arrivals=2),  # schedule (ping-pong) barrier
  )
  kw = {"interpret": interpret_params()} if cfg.interpret else {}
  nqt = tq // (2 * bq)
  kernel = plgpu.kernel(
      named(_kernel, "mla_attention_fwd", cfg=cfg, parts=parts, nk=pl.cdiv(cfg.kv_len, bk),
            nqt=nqt, g=h // hk, sep_out=sep_out),
      out_type=(jax.ShapeDtypeStruct((b, tq, h, dv), q.dtype),
                jax.ShapeDtypeStruct((b, h, tq), jnp.float32)),
      scratch_types=(q_smems, k_smems, v_smem, o_sep, lse_smem, seg_smems, barriers),
      grid=(h, nqt, b),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=3,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      **kw,
  )
  args = [off, q, k, v] + ([q_seg, kv_seg] if cfg.has_segments else [])
  o, lse = kernel(*args)
  return o, lse


def backward_choice(dqk: int, dv: int, itemsize: int, blocks: BlockSizes,
                    has_segments: bool) -> tuple[str, str | None]:
  """(backward that runs, why not the Mosaic one or None): "mosaic" when asked for and the
  shapes fit, else "triton". The forward's checks (dtype, head dims) already hold here; the
  Mosaic backward can only refuse tiles whose shared memory exceeds the CTA's."""
  if blocks.backward_impl == "triton":
    return "triton", "backward_impl='triton'"
  reason = mgpu_bwd.unsupported_reason(dqk, dv, itemsize, blocks.mosaic_backward, has_segments,
                                       SMEM_BYTES)
  return ("triton", reason) if reason else ("mosaic", None)


def _forward(q, k, v, off, q_seg, kv_seg, cfg: KernelConfig, save_lse: bool):
  o, lse = forward(q, k, v, off, q_seg, kv_seg, cfg)
  return (o, lse) if save_lse else o


def _backward(q, k, v, off, q_seg, kv_seg, o, lse, do, cfg: KernelConfig):
  blocks: BlockSizes = cfg.blocks
  impl, _ = backward_choice(q.shape[-1], v.shape[-1], q.dtype.itemsize, blocks, cfg.has_segments)
  if impl == "mosaic":
    return mgpu_bwd.backward(q, k, v, off, q_seg, kv_seg, o, lse, do,
                             dataclasses.replace(cfg, blocks=blocks.mosaic_backward),
                             _parts(q.shape[-1], v.shape[-1]))
  # asked for, or the Mosaic backward's tiles do not fit in shared memory
  return triton_gpu.backward(q, k, v, off, q_seg, kv_seg, o, lse, do,
                             dataclasses.replace(cfg, blocks=blocks.backward))


_attention = kernel_vjp(_forward, _backward)


def padded_lengths(q_len: int, kv_len: int, blocks: BlockSizes) -> tuple[int, int]:
  """Padded (q_len, kv_len): multiples of the forward tiles and of both backwards' tiles (the
  Mosaic backward may fall back to Triton)."""
  bw, mb = blocks.backward, blocks.mosaic_backward
  tq = round_up(q_len, math.lcm(2 * blocks.block_q, bw.block_q_dq, bw.block_q_dkv,
                                2 * mb.block_q_dq, mb.block_q_dkv))
  tk = round_up(kv_len, math.lcm(blocks.block_k, bw.block_k_dq, bw.block_k_dkv, mb.block_k_dq,
                                 2 * mb.block_k_dkv))
  return tq, tk


def mla_attention(q, k, v, q_offset, segment_ids, *, scale: float, causal: bool,
                  block_sizes: BlockSizes | None = None, interpret: bool = False):
  """Mosaic GPU forward + Mosaic GPU (or Triton) backward path of `mla_attention` (see the
  package docstring).

  q: [b, q_len, h, dqk] bf16/f16; k: [b, kv_len, hk, dqk]; v: [b, kv_len, hk, dv];
  q_offset: int32 [b]; segment_ids: None or (q_seg [b, q_len], kv_seg [b, kv_len]).
  Returns [b, q_len, h, dv] in q.dtype. Callers check `unsupported_reason` first.
  interpret: run the Mosaic GPU kernels in Mosaic GPU interpret mode (and a Triton backward in
  Triton interpret mode): CPU tests.
  """
  blocks = block_sizes or BlockSizes()
  reason = unsupported_reason(q, k, v, scale=scale, blocks=blocks,
                              has_segments=segment_ids is not None)
  if reason is not None:
    raise ValueError(f"Mosaic GPU MLA attention cannot take these inputs: {reason}")
  sq, sk = q.shape[1], k.shape[1]
  tq, tk = padded_lengths(sq, sk, blocks)
  cfg = KernelConfig(scale=float(scale), causal=causal, has_segments=segment_ids is not None,
                     blocks=blocks, interpret=interpret, kv_len=sk)
  return padded_call(_attention, q, k, v, q_offset, segment_ids, cfg, tq, tk)
