"""Helpers shared by the Mosaic GPU (Hopper) kernels: device facts, interpret mode, wgmma on
transposed tiles, TMA stores of a dynamic row count, and the memory warpgroup's slot ring.

Mosaic GPU's interpreter (jax._src.pallas.mosaic_gpu.interpret, used by the CPU tests) models
shared memory, barriers, TMA and wgmma, but not transposed wgmma operands nor register layout
hints; `wgmma_t` and `wgmma_iota` take the interpreter-safe route when `interpret` is set, so
the kernels themselves stay one code path (the hardware path is what the CUDA lowering tests
compile).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = ["named", "num_sms", "grid_size", "interpret_context", "interpret_params",
           "warpgroup_compiler_params", "loop_index", "load_ref", "snake", "wgmma_t", "wgmma_iota",
           "store_rows", "producer_ring", "opaque_zero"]

_H100_SMS = 132
_INTERPRET_CTAS = 4  # persistent CTAs in interpret mode (each is a simulated thread)


def num_sms() -> int:
  """SMs of the first GPU (132, the H100 SXM's, when there is none, e.g. CPU lowering tests)."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return _H100_SMS
  return int(getattr(dev, "core_count", 0) or _H100_SMS) if dev.platform == "gpu" else _H100_SMS


def grid_size(interpret: bool) -> int:
  """CTAs of a persistent kernel: one per SM, or a few simulated ones in interpret mode."""
  return _INTERPRET_CTAS if interpret else num_sms()


def named(fn, name: str, **kwargs):
  """functools.partial(fn, **kwargs) called `name`: Mosaic GPU names a kernel after its body
  (`<name>_mosaic_gpu_kernel` in ptxas reports and profiles; a bare partial is "anonymous")."""
  out = functools.partial(fn, **kwargs)
  out.__name__ = out.__qualname__ = name
  return out


def _interpret_module():
  try:
    from jax._src.pallas.mosaic_gpu.interpret import params as ip
  except ImportError as e:  # pragma: no cover - depends on the jax version
    raise RuntimeError("this jax has no Mosaic GPU interpret mode "
                       "(jax._src.pallas.mosaic_gpu.interpret); use the Triton flavour") from e
  return ip


def interpret_params(*, out_of_bounds_reads: str | None = None):
  """The `interpret=` value of `plgpu.kernel` for GPU interpret mode on CPU.

  out_of_bounds_reads="uninitialized" lets loads past an array's end through (as NaN), as
  hardware TMA does (it zero-fills them); the default makes them an error.
  """
  ip = _interpret_module()
  if out_of_bounds_reads is None:
    return ip.InterpretGPUParams()
  return ip.InterpretGPUParams(out_of_bounds_reads=out_of_bounds_reads)


def interpret_context(interpret: bool):
  """Context that traces Mosaic GPU kernels in GPU interpret mode (on CPU) when `interpret`,
  with out-of-bounds reads allowed (hardware TMA semantics)."""
  if not interpret:
    return contextlib.nullcontext()
  ip = _interpret_module()
  return ip.force_gpu_interpret_mode(interpret_params(out_of_bounds_reads="uninitialized"))


def warpgroup_compiler_params():
  """Compiler params of kernels written with warpgroup (not per-thread) semantics."""
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


_LOAD_TAKES_INDEX = "idx" in inspect.signature(plgpu.load).parameters


def load_ref(ref, *, layout=None):
  """`plgpu.load` of all of `ref` (index it with `ref.at[...]` first) into registers with
  `layout`: jax 0.10 takes a positional index argument, jax 0.12 none."""
  return plgpu.load(ref, (), layout=layout) if _LOAD_TAKES_INDEX else plgpu.load(ref, layout=layout)


def loop_index(info):
  """`plgpu.nd_loop` passes an NDLoopInfo (jax >= 0.8) or the index tuple (older)."""
  return tuple(info.index) if hasattr(info, "index") else tuple(info)


def snake(lin, shape, tile_width):
  """(row, col) of linear work id `lin`, columns grouped in bands of tile_width for L2 reuse."""
  if hasattr(plgpu, "planar_snake"):
    return plgpu.planar_snake(lin, shape, 1, tile_width)
  return lin // shape[1], lin % shape[1]


def wgmma_t(acc_ref, a_smem, b_smem, *, transpose_a: bool = False, transpose_b: bool = False,
            interpret: bool = False) -> None:
  """acc += op(a) @ op(b) on SMEM tiles, op = transpose when asked (`ref.transpose`).

  In interpret mode a transposed operand is first copied, transposed, into a scratch SMEM tile
  (numerically the same product).
  """
  if not interpret or not (transpose_a or transpose_b):
    a = a_smem.transpose((1, 0)) if transpose_a else a_smem
    b = b_smem.transpose((1, 0)) if transpose_b else b_smem
    plgpu.wgmma(acc_ref, a, b)
    return

  def flip(ref, do):
    return plgpu.SMEM(ref.shape[::-1] if do else ref.shape, ref.dtype)

  def scoped(a_t, b_t):
    a_t[...] = a_smem[...].T if transpose_a else a_smem[...]
    b_t[...] = b_smem[...].T if transpose_b else b_smem[...]
    plgpu.commit_smem()
    plgpu.wgmma(acc_ref, a_t, b_t)
    plgpu.wgmma_wait(0)

  pl.run_scoped(scoped, flip(a_smem, transpose_a), flip(b_smem, transpose_b))


def wgmma_iota(shape, dim: int, interpret: bool = False) -> jax.Array:
  """int32 iota along `dim` in the WGMMA register layout (the layout hint is hardware-only)."""
  iota = lax.broadcasted_iota(jnp.int32, shape, dim)
  return iota if interpret else plgpu.layout_cast(iota, plgpu.Layout.WGMMA)


def opaque_zero(x, interpret: bool = False):
  """int32 0 that LLVM cannot prove is 0, derived from the loop-variant scalar `x`.

  Index a loop-invariant shared-memory operand of a wgmma with `i + opaque_zero(j)` inside a
  loop over j: otherwise LLVM hoists its wgmma descriptors (one 64-bit value per 16-wide K step,
  e.g. 36 for a [64, 576] Q tile) out of the loop and ptxas holds them in registers across it,
  where an accumulator-heavy warpgroup has none to spare (the register spills bench/gpu_aot.py
  reported); this way each step derives them from one base address, as for the streamed tiles.
  Interpret mode: a plain 0.
  """
  if interpret:
    return 0
  return lax.optimization_barrier(x) - x


def store_rows(o_smem, o_gmem, row0, start, size, col_slice, max_rows):
  """TMA-stores o_smem rows [start, start+size) to o_gmem rows row0+start.. (`size` dynamic,
  < 2 * max_rows): a TMA box is static, so the rows go as a ladder of power-of-two chunks."""
  remaining = max_rows
  while remaining > 0:
    chunk = 1 << int(math.log2(remaining))
    remaining //= 2

    @pl.when((size & chunk) != 0)
    def _():
      plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(start, chunk)],
                              o_gmem.at[pl.ds(row0 + start, chunk), col_slice])

    start = start + (size & chunk)
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def producer_ring(streams, total, stages: int, *, static_steps: int | None = None) -> None:
  """The memory warpgroup's loop: fill a ring of `stages` SMEM slots with steps 0..total-1.

  streams: (release, load) pairs, one per independently released buffer (e.g. K and V);
    load(step, slot) issues the TMA copies of `step` into `slot`; release(slot) waits until the
    consumers have freed `slot` (barrier waits). Each stream is refilled as soon as its own slot
    is free.
  total: the number of steps (may be traced); static_steps: a static upper bound on it, so the
    prologue never slices past the arrays.
  The last `stages` releases are waited for too, so no barrier phase is left pending at exit
  (the interpreter checks this; it costs nothing on hardware).
  """
  first = stages if static_steps is None else min(stages, static_steps)
  for i in range(first):
    @pl.when(i < total)
    def _():
      for _, load in streams:
        load(i, i)

  @pl.loop(0, jnp.maximum(total - stages, 0))
  def _(j):
    slot = lax.rem(j, stages)
    for release, load in streams:
      release(slot)
      load(j + stages, slot)

  @pl.loop(jnp.maximum(total - stages, 0), total)
  def _(j):
    for release, _ in streams:
      release(lax.rem(j, stages))
