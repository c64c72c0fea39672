"""Grouped (ragged) matmul for MoE experts: bf16/f32 with a custom VJP, and FP8 for inference.

Letters: T rows (tokens sorted by expert), G groups (experts), K contraction, N output.
  lhs [T, K]; group_sizes int32 [G] with sum <= T: group g owns rows
  [sum(sizes[:g]), sum(sizes[:g+1])); rows past the sum produce zeros (as `jax.lax.ragged_dot`).
  grouped_matmul:      rhs [G, K, N] bf16/f32                         -> [T, N]
  grouped_matmul_fp8:  rhs [G, N, K] float8_e4m3fn (per-expert [out, in] checkpoint weights)
                       rhs_scale [G, ceil(N/128), ceil(K/128)] float32 -> [T, N]

Stacked weights (inference): with `layer=` (an int, may be traced) rhs is the scanned stack
[L, G, K, N] (FP8: [L, G, N, K] and [L, G, ...] scales) and the product uses rhs[layer]; the TPU
kernels read that layer's tiles in place (layer index scalar-prefetched into the weight's block
index map), so a decode step never copies a layer's experts out of the stack. Forward only.

Backward of grouped_matmul uses the same kernels, through the public `grouped_matmul_dlhs` and
`transposed_grouped_matmul` (the one place the backward kernels are chosen): dlhs = gmm(dout,
rhs^T) (rhs read transposed in the kernel, never materialised) and drhs[g] = lhs_g^T . dout_g
(a transposed grouped matmul, [G, K, N]; empty groups get zero gradients). On TPU all are our kernels (tpu_train.py), which
compute only the row tiles holding rows of some group and whose cost estimates count those.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from dsv3_jax.kernels_pallas.backend import Backend, KernelRequestError, gpu_flavor, select
from dsv3_jax.kernels_pallas.grouped_matmul import gpu, mosaic_gpu, tpu
from dsv3_jax.kernels_pallas.grouped_matmul.reference import (at_layer, grouped_matmul_fp8_ref,
                                                              grouped_matmul_ref,
                                                              transposed_grouped_matmul_ref)

__all__ = ["grouped_matmul", "grouped_matmul_dlhs", "grouped_matmul_fp8",
           "transposed_grouped_matmul"]

_FLOATS = (jnp.bfloat16, jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Config:
  kind: str                     # "tpu" or "gpu"
  interpret: bool
  tiles: tuple[int, int, int] | None
  out_dtype: Any
  mosaic: bool = False          # GPU: Mosaic GPU (Hopper) kernels instead of Triton
  forced: bool = False          # gpu_impl="mosaic" was asked for: no Triton fallback
  rows: int | None = None       # live rows the TPU cost estimates assume (None: all T)

  @property
  def kernels(self):
    return tpu if self.kind == "tpu" else gpu

  @property
  def cost_kw(self) -> dict:
    """The TPU kernels' cost-estimate argument (the GPU kernels take none)."""
    return {"rows": self.rows} if self.kind == "tpu" else {}

  @property
  def request(self) -> dict:
    """The arguments of `grouped_matmul_dlhs` / `transposed_grouped_matmul` that select this
    config's implementation, so the backward dispatches where they do. A Mosaic GPU forward
    under auto (cfg.mosaic, not forced) asks gpu_impl=None: the same `gpu_flavor` rule that
    chose Mosaic here chooses it again (with its Triton fallback); forward `tiles` stay
    forward-only (the backward kernels use their defaults)."""
    gpu_impl = None
    if self.kind == "gpu":
      gpu_impl = ("mosaic" if self.forced else None) if self.mosaic else "triton"
    return dict(backend="interpret" if self.interpret else "pallas", platform=self.kind,
                gpu_impl=gpu_impl, rows=self.rows)


def _mosaic_gmm(lhs, rhs, group_sizes, *, transpose_rhs=False, out_dtype, interpret,
                forced=False):
  """Mosaic GPU gmm, or Triton when `mosaic_gpu.unsupported_reason` names a reason (auto only:
  `forced`, an explicit gpu_impl="mosaic", raises instead)."""
  c = lhs.shape[1]
  d = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  reason = mosaic_gpu.unsupported_reason(lhs.dtype, rhs.dtype, out_dtype, c, d, rows=lhs.shape[0])
  if reason and forced:
    raise _forced_error("grouped_matmul", reason)
  if reason:
    return gpu.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                   interpret=interpret)
  return mosaic_gpu.gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, interpret=interpret)


def _mosaic_tgmm(lhs, dout, group_sizes, *, num_groups, out_dtype, interpret, forced=False):
  """Mosaic GPU tgmm, or Triton when `mosaic_gpu.unsupported_reason` names a reason (auto only,
  as in `_mosaic_gmm`)."""
  out_dtype = jnp.dtype(out_dtype or lhs.dtype)
  reason = mosaic_gpu.unsupported_reason(lhs.dtype, dout.dtype, out_dtype, lhs.shape[1],
                                         dout.shape[1], tgmm=True, rows=lhs.shape[0])
  if reason and forced:
    raise _forced_error("transposed_grouped_matmul", reason)
  if reason:
    return gpu.tgmm(lhs, dout, group_sizes, num_groups=num_groups, out_dtype=out_dtype,
                    interpret=interpret)
  return mosaic_gpu.tgmm(lhs, dout, group_sizes, num_groups=num_groups, interpret=interpret)


def _forced_error(what: str, reason: str) -> KernelRequestError:
  return KernelRequestError(f"{what} gpu_impl='mosaic' cannot take these inputs: {reason} "
                            f"(use gpu_impl='triton' or 'auto')")


def _check_group_sizes(group_sizes: jax.Array, num_groups: int) -> jax.Array:
  if group_sizes.shape != (num_groups,) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes must be integer [{num_groups}], got {group_sizes.shape} "
                     f"{group_sizes.dtype}")
  return group_sizes.astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(lhs, rhs, group_sizes, cfg: _Config):
  if cfg.mosaic:
    return _mosaic_gmm(lhs, rhs, group_sizes, out_dtype=cfg.out_dtype, interpret=cfg.interpret,
                       forced=cfg.forced)
  return cfg.kernels.gmm(lhs, rhs, group_sizes, out_dtype=cfg.out_dtype, tiles=cfg.tiles,
                         interpret=cfg.interpret, **cfg.cost_kw)


def _gmm_fwd(lhs, rhs, group_sizes, cfg):
  return _gmm(lhs, rhs, group_sizes, cfg), (lhs, rhs, group_sizes)


def _gmm_bwd(cfg, residuals, dout):
  lhs, rhs, group_sizes = residuals
  dout = dout.astype(lhs.dtype)
  dlhs = grouped_matmul_dlhs(dout, rhs, group_sizes, out_dtype=lhs.dtype, **cfg.request)
  drhs = transposed_grouped_matmul(lhs, dout, group_sizes, out_dtype=rhs.dtype, **cfg.request)
  return dlhs, drhs, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm_at_layer(lhs, rhs, group_sizes, layer, cfg: _Config):
  return tpu.gmm_layer(lhs, rhs, group_sizes, layer, out_dtype=cfg.out_dtype, tiles=cfg.tiles,
                       interpret=cfg.interpret, rows=cfg.rows)


def _gmm_at_layer_fwd(lhs, rhs, group_sizes, layer, cfg):
  return _gmm_at_layer(lhs, rhs, group_sizes, layer, cfg), None


def _gmm_at_layer_bwd(cfg, residuals, dout):
  raise TypeError("grouped_matmul(layer=...) reads a weight stack in place for inference and "
                  "has no gradient; differentiate grouped_matmul on rhs[layer] (no layer=)")


_gmm_at_layer.defvjp(_gmm_at_layer_fwd, _gmm_at_layer_bwd)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                   out_dtype=None, tiling: tuple[int, int, int] | None = None,
                   backend: Backend | str = "auto", platform: str | None = None,
                   gpu_impl: str | None = None, layer=None,
                   rows: int | None = None) -> jax.Array:
  """out[rows of g] = lhs[rows of g] . rhs[g]; differentiable in lhs and rhs (without `layer`).

  Args:
    lhs: [T, K] bfloat16/float32, rows sorted by group.
    rhs: [G, K, N] bfloat16/float32 (operands of different dtypes are promoted to a common one);
      with `layer`, the stack [L, G, K, N] of which rhs[layer] is used.
    layer: None, or an int / int32 scalar (may be traced) into rhs's leading axis (clipped to
      [0, L)). On TPU a kernel reads that layer's tiles of the stack in place (no slice of the
      stack is materialised; weight tiles are cast to the compute dtype in VMEM); the reference
      and GPU paths slice it. Inference only: its gradient raises TypeError.
    rows: the live rows (sum(group_sizes)) our TPU kernels' cost estimates assume (forward and
      backward), e.g. the average load of a capacity-sized buffer; default T. Figures only:
      never changes results (the kernels skip the rows past the groups whatever it says).
    group_sizes: [G] integer, sum <= T (a larger sum is clipped to T); empty groups allowed.
    out_dtype: output dtype, default the operands' dtype; accumulation is float32.
    tiling: forward (bm, bk, bn) override: powers of two on GPU, multiples of (8, 128, 128) on
      TPU (cut to whole dims when larger). The backward uses each kernel's defaults.
    backend, platform: see `dsv3_jax.kernels_pallas.backend.select`.
    gpu_impl: GPU flavour, "triton" / "mosaic" / None (auto: Mosaic GPU on Hopper; see
      `backend.gpu_flavor`). Mosaic GPU runs bf16/f16 with out_dtype equal to the operands, K and
      N multiples of the tile and T a multiple of 8; under auto other cases (and `tiling`) use
      Triton, while gpu_impl="mosaic" raises `KernelRequestError` for them (also in the VJP).

  Returns:
    [T, N]; rows past sum(group_sizes) are zero.
  """
  stacked = layer is not None
  if lhs.ndim != 2 or rhs.ndim != 3 + stacked or lhs.shape[1] != rhs.shape[-2]:
    want = "[L, G, K, N] (layer= given)" if stacked else "[G, K, N]"
    raise ValueError(f"expected lhs [T, K] and rhs {want}, got {lhs.shape} and {rhs.shape}")
  if lhs.dtype not in _FLOATS or rhs.dtype not in _FLOATS:
    raise ValueError(f"grouped_matmul takes bfloat16/float32, got {lhs.dtype} and {rhs.dtype} "
                     f"(FP8 weights: grouped_matmul_fp8)")
  group_sizes = _check_group_sizes(group_sizes, rhs.shape[-3])
  dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
  if stacked:
    return _grouped_matmul_at_layer(lhs.astype(dtype), rhs, group_sizes, layer,
                                    jnp.dtype(out_dtype or dtype), tiling, backend, platform,
                                    gpu_impl, rows)
  lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
  out_dtype = jnp.dtype(out_dtype or dtype)
  impl = select(backend, platform=platform)
  if impl.kind == "reference" or 0 in lhs.shape or 0 in rhs.shape:
    return grouped_matmul_ref(lhs, rhs, group_sizes, out_dtype=out_dtype)
  mosaic = impl.kind == "gpu" and gpu_flavor(gpu_impl, has_mosaic=True) == "mosaic"
  forced = mosaic and gpu_impl == "mosaic"
  if forced and tiling is not None:
    raise _forced_error("grouped_matmul", "`tiling` is for the Triton/TPU kernels")
  mosaic = mosaic and tiling is None
  return _gmm(lhs, rhs, group_sizes,
              _Config(impl.kind, impl.interpret, tiling, out_dtype, mosaic, forced, rows=rows))


def _grouped_matmul_at_layer(lhs, rhs, group_sizes, layer, out_dtype, tiling, backend, platform,
                             gpu_impl, rows):
  """`grouped_matmul` with layer=: lhs already in the compute dtype, rhs the [L, G, K, N] stack."""
  impl = select(backend, platform=platform)
  if impl.kind == "tpu" and 0 not in lhs.shape and 0 not in rhs.shape:
    layer = jnp.asarray(layer, jnp.int32)
    return _gmm_at_layer(lhs, rhs, group_sizes, layer,
                         _Config("tpu", impl.interpret, tiling, out_dtype, rows=rows))
  # Reference and GPU: XLA slices the layer (GPU kernels take [G, K, N]).
  return grouped_matmul(lhs, at_layer(rhs, layer).astype(lhs.dtype), group_sizes,
                        out_dtype=out_dtype, tiling=tiling, backend=backend, platform=platform,
                        gpu_impl=gpu_impl)


def _add_acc(out, acc):
  """acc + out in float32, rounded once to acc's dtype (the in-place kernels' arithmetic)."""
  if acc is None:
    return out
  return (acc.astype(jnp.float32) + out.astype(jnp.float32)).astype(acc.dtype)


def _check_acc(acc, shape, what: str):
  if acc is not None and (acc.shape != shape or acc.dtype not in _FLOATS):
    raise ValueError(f"{what}: acc must be bfloat16/float32 {shape} (the output), got "
                     f"{acc.shape} {acc.dtype}")


def transposed_grouped_matmul(lhs: jax.Array, dout: jax.Array, group_sizes: jax.Array, *,
                              out_dtype=None, backend: Backend | str = "auto",
                              platform: str | None = None,
                              gpu_impl: str | None = None, acc: jax.Array | None = None,
                              rows: int | None = None) -> jax.Array:
  """out[g] = lhs_g^T . dout_g: lhs [T, K], dout [T, N] (one dtype, bf16/f32) -> [G, K, N].

  The weight-gradient product of `grouped_matmul`, with G = len(group_sizes) (sum <= T); groups
  with no rows give zeros. out_dtype defaults to lhs.dtype (acc's dtype when given);
  accumulation is float32. gpu_impl: "triton" / "mosaic" / None (auto), as in `grouped_matmul`.
  acc: None, or [G, K, N]: returns acc + the products, summed in float32 and rounded once; the
  TPU kernel writes the result in place of acc (an input_output alias: no second [G, K, N]
  buffer when acc is dead afterwards), other backends add. rows: as in `grouped_matmul`.
  Not differentiable (a backward's building block).
  """
  if (lhs.ndim != 2 or dout.ndim != 2 or lhs.shape[0] != dout.shape[0]
      or lhs.dtype != dout.dtype or lhs.dtype not in _FLOATS):
    raise ValueError(f"expected lhs [T, K] and dout [T, N] of one dtype (bf16/f32), got "
                     f"{lhs.shape} {lhs.dtype} and {dout.shape} {dout.dtype}")
  if group_sizes.ndim != 1:
    raise ValueError(f"group_sizes must be [G], got {group_sizes.shape}")
  group_sizes = _check_group_sizes(group_sizes, group_sizes.shape[0])
  _check_acc(acc, (group_sizes.shape[0], lhs.shape[1], dout.shape[1]), "transposed_grouped_matmul")
  if acc is not None:
    out_dtype = acc.dtype
  impl = select(backend, platform=platform)
  if impl.kind == "reference" or 0 in lhs.shape or 0 in dout.shape:
    return _add_acc(transposed_grouped_matmul_ref(lhs, dout, group_sizes, out_dtype=out_dtype),
                    acc)
  if impl.kind == "gpu" and gpu_flavor(gpu_impl, has_mosaic=True) == "mosaic":
    return _add_acc(_mosaic_tgmm(lhs, dout, group_sizes, num_groups=group_sizes.shape[0],
                                 out_dtype=out_dtype, interpret=impl.interpret,
                                 forced=gpu_impl == "mosaic"), acc)
  if impl.kind == "tpu":
    return tpu.tgmm(lhs, dout, group_sizes, num_groups=group_sizes.shape[0], out_dtype=out_dtype,
                    interpret=impl.interpret, rows=rows, acc=acc)
  return _add_acc(gpu.tgmm(lhs, dout, group_sizes, num_groups=group_sizes.shape[0],
                           out_dtype=out_dtype, interpret=impl.interpret), acc)


def grouped_matmul_dlhs(dout: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *,
                        out_dtype=None, backend: Backend | str = "auto",
                        platform: str | None = None, gpu_impl: str | None = None,
                        acc: jax.Array | None = None, rows: int | None = None) -> jax.Array:
  """out[rows of g] = dout[rows of g] . rhs[g]^T: the input gradient of `grouped_matmul`.

  dout [T, N] and rhs [G, K, N] (bf16/f32; promoted to a common dtype) -> [T, K]; rows past
  sum(group_sizes) are zero (acc's rows when acc is given). rhs is read transposed by the
  kernels (never materialised). acc: None, or [T, K]: returns acc + the product, summed in
  float32 and rounded once; the TPU kernel writes it in place of acc (input_output alias), other
  backends add. out_dtype: default the operands' dtype (acc's when given). rows: as in
  `grouped_matmul`. Not differentiable (a backward's building block).
  """
  if dout.ndim != 2 or rhs.ndim != 3 or dout.shape[1] != rhs.shape[2]:
    raise ValueError(f"expected dout [T, N] and rhs [G, K, N], got {dout.shape} and {rhs.shape}")
  if dout.dtype not in _FLOATS or rhs.dtype not in _FLOATS:
    raise ValueError(f"grouped_matmul_dlhs takes bfloat16/float32, got {dout.dtype} and "
                     f"{rhs.dtype}")
  group_sizes = _check_group_sizes(group_sizes, rhs.shape[0])
  _check_acc(acc, (dout.shape[0], rhs.shape[1]), "grouped_matmul_dlhs")
  dtype = jnp.promote_types(dout.dtype, rhs.dtype)
  dout, rhs = dout.astype(dtype), rhs.astype(dtype)
  out_dtype = jnp.dtype(acc.dtype if acc is not None else (out_dtype or dtype))
  impl = select(backend, platform=platform)
  if impl.kind == "reference" or 0 in dout.shape or 0 in rhs.shape:
    out = grouped_matmul_ref(dout, jnp.swapaxes(rhs, 1, 2), group_sizes, out_dtype=out_dtype)
    return _add_acc(out, acc)
  if impl.kind == "tpu":
    return tpu.gmm(dout, rhs, group_sizes, transpose_rhs=True, out_dtype=out_dtype,
                   interpret=impl.interpret, rows=rows, acc=acc)
  if gpu_flavor(gpu_impl, has_mosaic=True) == "mosaic":
    out = _mosaic_gmm(dout, rhs, group_sizes, transpose_rhs=True, out_dtype=out_dtype,
                      interpret=impl.interpret, forced=gpu_impl == "mosaic")
  else:
    out = gpu.gmm(dout, rhs, group_sizes, transpose_rhs=True, out_dtype=out_dtype,
                  interpret=impl.interpret)
  return _add_acc(out, acc)


def grouped_matmul_fp8(lhs: jax.Array, rhs: jax.Array, rhs_scale: jax.Array,
                       group_sizes: jax.Array, *, lhs_scale: jax.Array | None = None,
                       out_dtype=jnp.bfloat16, tiling: tuple[int, int, int] | None = None,
                       backend: Backend | str = "auto", platform: str | None = None,
                       layer=None, rows: int | None = None) -> jax.Array:
  """FP8 block-scaled grouped matmul for inference (not differentiable).

  Args:
    lhs: [T, K] bfloat16/float32, or float8_e4m3fn with lhs_scale [T, ceil(K/128)] float32
      (1 x 128 tiles, as from `fp8.quantize_activations`).
    rhs: [G, N, K] float8_e4m3fn, the experts' [out, in] weights stacked.
    rhs_scale: [G, ceil(N/128), ceil(K/128)] float32, each expert's 128 x 128 block scales.
    group_sizes: [G] integer, sum <= T.
    out_dtype: output dtype (bf16 default); accumulation is float32.
    tiling: (bm, bk, bn) override (GPU: powers of two, bk = 128, bn dividing 128).
    layer: None, or an int (may be traced): rhs [L, G, N, K] and rhs_scale [L, G, ...] are
      stacks and layer `layer` is used; the TPU kernel reads its weight tiles in place (see
      `grouped_matmul`), the reference and GPU paths slice it.
    rows: the live rows the TPU kernel's cost estimate assumes (default T), as in
      `grouped_matmul`.

  Returns:
    [T, N]; rows past sum(group_sizes) are zero. GPU: e4m3 x e4m3 on the tensor cores when lhs
    is e4m3, else the weight tile is upcast exactly; block scales are applied to each 128-wide
    K step's float32 partial. TPU: weight (and e4m3 lhs) tiles are decoded in VMEM, scaled, and
    multiplied in bf16.
  """
  lead = rhs.shape[:1] if layer is not None else ()
  if rhs.ndim != 3 + len(lead) or rhs.dtype != jnp.float8_e4m3fn or lhs.ndim != 2:
    want = "[L, G, N, K] (layer= given)" if lead else "[G, N, K]"
    raise ValueError(f"expected lhs [T, K] and rhs {want} float8_e4m3fn, got {lhs.shape} "
                     f"and {rhs.shape} {rhs.dtype}")
  num_groups, n, k = rhs.shape[-3:]
  if lhs.shape[1] != k:
    raise ValueError(f"lhs {lhs.shape} and rhs {rhs.shape} disagree on K")
  want = (*lead, num_groups, -(-n // 128), -(-k // 128))
  if rhs_scale.shape != want:
    raise ValueError(f"rhs_scale must be {want}, got {rhs_scale.shape}")
  if lhs_scale is None and lhs.dtype not in _FLOATS:
    raise ValueError(f"lhs must be bfloat16/float32, or float8_e4m3fn with lhs_scale; "
                     f"got {lhs.dtype}")
  if lhs_scale is not None and (lhs.dtype != jnp.float8_e4m3fn
                                or lhs_scale.shape != (lhs.shape[0], want[2])):
    raise ValueError(f"with lhs_scale, lhs must be float8_e4m3fn and lhs_scale "
                     f"{(lhs.shape[0], want[2])}; got {lhs.dtype} and {lhs_scale.shape}")
  group_sizes = _check_group_sizes(group_sizes, num_groups)
  impl = select(backend, platform=platform)
  if impl.kind == "reference" or 0 in lhs.shape or n == 0:
    return grouped_matmul_fp8_ref(lhs, rhs, rhs_scale, group_sizes, lhs_scale=lhs_scale,
                                  out_dtype=out_dtype, layer=layer)
  rhs_scale = rhs_scale.astype(jnp.float32)
  lhs_scale = None if lhs_scale is None else lhs_scale.astype(jnp.float32)
  if impl.kind == "tpu":
    return tpu.gmm_fp8(lhs, rhs, rhs_scale, group_sizes, lhs_scale=lhs_scale,
                       layer=None if layer is None else jnp.asarray(layer, jnp.int32),
                       out_dtype=out_dtype, tiles=tiling, interpret=impl.interpret, rows=rows)
  rhs, rhs_scale = at_layer(rhs, layer), at_layer(rhs_scale, layer)
  return gpu.gmm(lhs, rhs, group_sizes, transpose_rhs=True, lhs_scale=lhs_scale,
                 rhs_scale=rhs_scale, out_dtype=out_dtype, tiles=tiling,
                 interpret=impl.interpret)
