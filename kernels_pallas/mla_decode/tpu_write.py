"""Writes new tokens' rope keys into the transposed rope cache [L, B, R, S] in place (TPU).

Why a kernel: XLA:TPU lays a scatter's operand out so that the scatter window covers its minor
dimension, so writing a column (one position, all R dims) of [.., R, S] by `.at[].set` makes XLA
keep the whole rope stack with R minor and copy it to row-major around every `mla_decode` call
(measured: `tests/test_cache_layout.py`). This kernel aliases the stack to its output and, per
sequence, DMAs the tile-aligned window of lanes that holds the new positions into VMEM, sets the
new columns and DMAs the window back: 2 x B x R x W values move, whatever the capacity.

Mosaic DMAs need lane offsets that are multiples of 128, so the window is W = 128 lanes (one
token) or 256 (T <= 129 consecutive tokens may straddle a tile boundary) starting at a multiple
of 128; a capacity S <= 256 is handled as one window of S lanes; otherwise S must be a multiple
of 128 (the Generator rounds its capacity so).

Paged pools [L, pages, R, page] (the serving engine's) are the same array with `seq` naming the
page each row writes (`seq`) and `start` the position relative to that page's first column
(negative or past the page for a chunk straddling pages: only the columns inside the page are
set; the caller calls once per page a chunk can touch).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsv3_jax.kernels_pallas.cost import nbytes

__all__ = ["write_rope", "window"]

LANES = 128
MAX_SEQS_PER_STEP = 32  # VMEM: 32 x R x 256 values per grid step


def window(capacity: int, tokens: int) -> int:
  """Lanes per sequence the kernel reads and writes back; raises ValueError for shapes it cannot
  take (names the capacity)."""
  if capacity <= 2 * LANES:
    return capacity
  if capacity % LANES:
    raise ValueError(f"the TPU rope-cache write needs a capacity (cache rows) that is a multiple "
                     f"of {LANES} or at most {2 * LANES}; got {capacity}")
  if tokens > LANES + 1:
    raise ValueError(f"the TPU rope-cache write takes at most {LANES + 1} new tokens per call; "
                     f"got {tokens}")
  return LANES if tokens == 1 else 2 * LANES


def _kernel(layer_ref, start_ref, seq_ref, new_ref, rope_in, rope_out, buf, sems, *, seqs: int,
            w: int, capacity: int, tokens: int):
  del rope_in  # aliased to rope_out
  layer, b0 = layer_ref[0], pl.program_id(0) * seqs

  def lo(i):
    if w == capacity:
      return 0
    lo_ = jnp.clip(lax.div(start_ref[b0 + i], LANES) * LANES, 0, capacity - w)
    return pl.multiple_of(lo_, LANES) if w % LANES == 0 else lo_

  def dma(i, read: bool):
    hbm = rope_out.at[layer, seq_ref[b0 + i], :, pl.ds(lo(i), w)]
    src, dst = (hbm, buf.at[i]) if read else (buf.at[i], hbm)
    return pltpu.make_async_copy(src, dst, sems.at[i])

  for read in (True, False):
    if not read:
      @pl.loop(0, seqs)
      def _set(i):
        blk = buf[i]  # (R, w)
        col = lax.broadcasted_iota(jnp.int32, blk.shape, 1) + lo(i)
        new = new_ref[i]  # (R, T)
        for t in range(tokens):
          blk = jnp.where(col == start_ref[b0 + i] + t, new[:, t:t + 1].astype(blk.dtype), blk)
        buf[i] = blk

    @pl.loop(0, seqs)
    def _start(i):
      dma(i, read).start()

    @pl.loop(0, seqs)
    def _wait(i):
      dma(i, read).wait()


def write_rope(rope, layer, new, start, *, seq=None, interpret: bool = False):
  """rope [L, N, R, S] with new [B, T, R] written at columns start[b] .. start[b] + T - 1 of
  rope[layer, seq[b]] (those inside 0..S-1); layer int32 [1]; start int32 [B]; seq int32 [B]
  (default b, N = B: one sequence per row). Returns the updated rope (the same buffer when the
  caller donates it / inside a scan carry). Rows naming the same seq must not write it in the
  same call (except a scratch page whose contents do not matter)."""
  L, N, R, S = rope.shape
  B, T = new.shape[0], new.shape[1]
  if seq is None:
    seq = jnp.arange(B, dtype=jnp.int32)
  w = window(S, T)
  seqs = max(d for d in range(1, min(B, MAX_SEQS_PER_STEP) + 1) if B % d == 0)
  new_t = jnp.swapaxes(new, 1, 2).astype(rope.dtype)  # [B, R, T]
  kernel = functools.partial(_kernel, seqs=seqs, w=w, capacity=S, tokens=T)
  window_bytes = B * R * w * rope.dtype.itemsize
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(B // seqs,),
          in_specs=[pl.BlockSpec((seqs, R, T), lambda i, *_: (i, 0, 0)),
                    pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec(memory_space=pl.ANY),
          scratch_shapes=[pltpu.VMEM((seqs, R, w), rope.dtype),
                          pltpu.SemaphoreType.DMA((seqs,))],
      ),
      out_shape=jax.ShapeDtypeStruct(rope.shape, rope.dtype),
      input_output_aliases={4: 0},  # operands: layer, start, seq, new_t, rope
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=interpret,
      name="mla_rope_write",
      cost_estimate=pl.CostEstimate(flops=0, transcendentals=0,
                                    bytes_accessed=2 * window_bytes + nbytes(new_t)),
  )(layer, start.astype(jnp.int32), seq.astype(jnp.int32), new_t, rope)
