"""Small building blocks: Linear, RMSNorm, gated MLP, YaRN rotary embedding.

Every parameter carries logical axis names in its `axes` metadata; `dsv3_jax.sharding` resolves
them to mesh axes. Logical weight axes used in this package:
  vocab, embed (hidden size), lora_in (the hidden-size input of q_a_proj / kv_a_proj_with_mqa),
  q_lora, kv_lora, heads (a fused heads*head_dim axis), mlp (dense/shared FFN width), expert,
  moe_embed (the routed experts' hidden size), moe_mlp (routed-expert FFN width), None (replicated).

Einsum letters: B batch, T sequence, D hidden, F FFN width, I/O a linear's input/output.

FP8 weights (inference only): a `Linear` converted with `Linear.to_fp8` holds the checkpoint's
float8_e4m3fn weight in its [out, in] layout (`weight`, an `Fp8Value`) and the float32 128 x 128
block scales (`weight_scale_inv`, an `Fp8Scale`) instead of the dense [in, out] `kernel`, and
multiplies through `dsv3_jax.kernels_pallas.fp8_weight_matmul` (the weight crosses memory as one
byte per element). Neither variable is an `nnx.Param`, so optimizers skip them; differentiating
through an FP8 layer raises `Fp8TrainingError` (see `fp8_inference_only`).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import UserError

__all__ = ["Linear", "RMSNorm", "MLP", "rope_frequencies", "apply_rope", "INIT_STD", "FP8_BLOCK",
           "Fp8Variable", "Fp8Value", "Fp8Scale", "Fp8TrainingError", "fp8_inference_only",
           "dequantize_blocks", "check_fp8_weight"]

INIT_STD = 0.02
FP8_BLOCK = (128, 128)  # the block size the FP8 kernels take (DeepSeek-V3's weight_block_size)


class Fp8Variable(nnx.Variable):
  """Base type of the FP8 weight variables: inference-only state, not an `nnx.Param`."""


class Fp8Value(Fp8Variable):
  """A float8_e4m3fn weight in the checkpoint layout [..., out, in] (experts stacked first)."""


class Fp8Scale(Fp8Variable):
  """float32 block scales `scale_inv` [..., ceil(out/128), ceil(in/128)] of an `Fp8Value`:
  dequantised w[..., i, j] = value[..., i, j] * scale_inv[..., i // 128, j // 128]."""


class Fp8TrainingError(TypeError, UserError):
  """Raised when gradients are taken through a layer that holds FP8 weights."""


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fp8_inference_only(x: jax.Array, what: str) -> jax.Array:
  """Identity on x; its gradient raises `Fp8TrainingError` naming `what`.

  Applied to the input of every FP8-weight matmul, so `jax.grad` / the trainer fail at trace
  time with a clear message instead of silently training around frozen FP8 weights.
  """
  return x


def _guard_fwd(x, what):
  return x, None


def _guard_bwd(what, _, g):
  raise Fp8TrainingError(
      f"{what} holds FP8 (float8_e4m3fn) weights, which are inference-only: gradients through "
      f"it are not supported. To train or fine-tune, load the checkpoint dequantised "
      f"(from_pretrained(path, fp8='dequantize'), the default).")


fp8_inference_only.defvjp(_guard_fwd, _guard_bwd)


def dequantize_blocks(value: jax.Array, scale_inv: jax.Array, block=FP8_BLOCK) -> jax.Array:
  """value [..., R, C] e4m3 * scale_inv [..., ceil(R/bm), ceil(C/bn)] per block -> float32."""
  bm, bn = block
  r, c = value.shape[-2:]
  s = jnp.repeat(jnp.repeat(scale_inv.astype(jnp.float32), bm, axis=-2), bn, axis=-1)
  return value.astype(jnp.float32) * s[..., :r, :c]


def _normal(rngs: nnx.Rngs, shape, dtype):
  return (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def compute_cast(w: jax.Array, dtype) -> jax.Array:
  """A weight in the compute dtype, equal to `w.astype(dtype)`.

  float32 -> bfloat16 is written as integer round-to-nearest-even on the bits (the same values
  as the convert, NaN kept NaN) with the convert's gradient. Reason: XLA:TPU rewrites
  convert(dynamic-slice(stack)) inside a scanned layer loop into dynamic-slice(convert(stack))
  and hoists the convert out of the loop, making a bfloat16 copy of the whole layer stack that
  lives from the forward loop through the backward one (5.2 GiB per device for DeepSeek-V3 on
  256 chips). It does not see through the integer form, so each layer's weights are cast inside
  the loop, layer by layer (an optimization barrier does not help: it is removed first)."""
  dtype = jnp.dtype(dtype)
  if w.dtype == dtype:
    return w
  if w.dtype == jnp.float32 and dtype == jnp.bfloat16:
    return _f32_to_bf16(w)
  return w.astype(dtype)


@jax.custom_vjp
def _f32_to_bf16(w):
  bits = jax.lax.bitcast_convert_type(w, jnp.uint32)
  rounded = (bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))) >> 16
  quiet_nan = (bits >> 16) | jnp.uint32(0x40)
  hi = jnp.where(jnp.isnan(w), quiet_nan, rounded).astype(jnp.uint16)
  return jax.lax.bitcast_convert_type(hi, jnp.bfloat16)


def _f32_to_bf16_fwd(w):
  return _f32_to_bf16(w), None


def _f32_to_bf16_bwd(_, ct):
  return (ct.astype(jnp.float32),)


_f32_to_bf16.defvjp(_f32_to_bf16_fwd, _f32_to_bf16_bwd)


class Linear(nnx.Module):
  """y = x @ kernel, kernel [in, out] (the checkpoint's [out, in] weight, transposed).

  After `to_fp8` the layer holds `weight` [out, in] float8_e4m3fn and `weight_scale_inv`
  [ceil(out/128), ceil(in/128)] float32 instead, and computes
  y = x @ dequant(weight, weight_scale_inv)^T with `fp8_weight_matmul` (float32 accumulation,
  output in the compute dtype).
  """

  def __init__(self, in_features: int, out_features: int, *, axes: tuple, rngs: nnx.Rngs,
               param_dtype=jnp.float32, dtype=jnp.float32):
    self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), param_dtype), axes=axes)
    self.dtype = dtype
    self.fp8_backend: str | None = None  # set by to_fp8: the FP8 kernel backend
    self.fp8_platform: str | None = None

  @property
  def is_fp8(self) -> bool:
    return self.fp8_backend is not None

  def to_fp8(self, value, scale_inv, *, backend: str = "reference",
             platform: str | None = None) -> None:
    """Replaces `kernel` [in, out] by FP8 `weight` [out, in] e4m3 and `weight_scale_inv` (in place).

    value: [..., out, in] float8_e4m3fn (array or jax.ShapeDtypeStruct, for an abstract model;
    leading dims: a stacked layer's); scale_inv: [..., ceil(out/128), ceil(in/128)] float32. backend / platform: the kernel choice of
    `fp8_weight_matmul` (see `dsv3_jax.kernels_pallas.select`). The logical axes of `weight`
    are the kernel's reversed; the scales are replicated.
    """
    if self.is_fp8:
      raise ValueError("this Linear already holds FP8 weights")
    axes = self.kernel.get_metadata().get("axes")
    *lead, n_in, n_out = self.kernel.get_value().shape
    check_fp8_weight(value, scale_inv, (*lead, n_out, n_in), "Linear")
    del self.kernel
    swapped = None if axes is None else tuple(axes)[:-2] + (axes[-1], axes[-2])
    self.weight = Fp8Value(value, axes=swapped)
    # Scales replicated, apart from a leading layer axis (a stacked layer's Linear).
    self.weight_scale_inv = Fp8Scale(scale_inv, axes=(None if axes is None else
                                                      tuple(axes)[:-2] + (None, None)))
    self.fp8_backend, self.fp8_platform = backend, platform

  def dense_kernel(self) -> jax.Array:
    """The [in, out] kernel: the Param's value, or the FP8 weight dequantised (float32)."""
    if not self.is_fp8:
      return self.kernel.get_value()
    return jnp.swapaxes(dequantize_blocks(self.weight.get_value(),
                                          self.weight_scale_inv.get_value()), -1, -2)

  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.is_fp8:
      return jnp.einsum("...i,io->...o", x.astype(self.dtype),
                        compute_cast(self.kernel.get_value(), self.dtype))
    from dsv3_jax.kernels_pallas import fp8_weight_matmul
    from dsv3_jax.sharding import Dim, kernel_map
    w = self.weight.get_value()
    x2 = fp8_inference_only(x.reshape(-1, x.shape[-1]).astype(self.dtype), "a Linear layer")

    def kernel(x2, w, scale):
      return fp8_weight_matmul(x2, w, scale, out_dtype=self.dtype, backend=self.fp8_backend,
                               platform=self.fp8_platform)

    # Per shard of the ambient mesh: rows over the batch axes; the weight's out dim split as its
    # logical axis says when every shard keeps whole 128-row scale blocks (else whole); its in dim
    # whole (an FSDP-sharded in dim is all-gathered, as GSPMD does for a dense matmul).
    out = (self.weight.get_metadata().get("axes") or (None,))[0]
    w_axes = (None if out is None else Dim(out, FP8_BLOCK[0]), None)
    y = kernel_map(kernel, (("batch", None), w_axes, (out, None)), ("batch", out),
                   name="fp8_weight_matmul")(x2, w, self.weight_scale_inv.get_value())
    return y.reshape(*x.shape[:-1], w.shape[0])


def check_fp8_weight(value, scale_inv, shape: tuple[int, ...], what: str) -> None:
  """Checks an FP8 weight [..., out, in] (e4m3) and its 128 x 128 block scales against `shape`."""
  if tuple(value.shape) != tuple(shape) or value.dtype != jnp.float8_e4m3fn:
    raise ValueError(f"{what}: FP8 weight must be {tuple(shape)} float8_e4m3fn ([..., out, in]), "
                     f"got {tuple(value.shape)} {value.dtype}")
  bm, bn = FP8_BLOCK
  want = tuple(shape[:-2]) + (-(-shape[-2] // bm), -(-shape[-1] // bn))
  if tuple(scale_inv.shape) != want:
    raise ValueError(f"{what}: FP8 scale_inv must be {want} ({bm}x{bn} blocks of "
                     f"{tuple(shape)}), got {tuple(scale_inv.shape)}")


class RMSNorm(nnx.Module):
  """weight * x / rms(x), with the statistics in float32 (as transformers and the official code)."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=(None,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    w = self.weight.get_value()
    return w.astype(x.dtype) * y.astype(x.dtype)


class MLP(nnx.Module):
  """down(silu(gate(x)) * up(x)): the dense FFN and the shared experts."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, param_dtype, dtype):
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    self.gate_proj = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
    self.up_proj = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
    self.down_proj = Linear(hidden, dim, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
  """Inverse frequencies [qk_rope_head_dim/2] (float32) and the cos/sin multiplier.

  Plain rope: 1/theta^(2i/d). YaRN: frequencies below the correction range are divided by
  `factor`, those above kept, a linear ramp in between (low = floor, high = ceil of the
  correction dims when `truncate`).
  """
  d = cfg.qk_rope_head_dim
  base = cfg.rope_theta
  freqs = 1.0 / (base ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
  y = cfg.rope_scaling
  if y is None:
    return freqs.astype(np.float32), 1.0

  def corr_dim(rot):
    return d * math.log(y.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

  low, high = corr_dim(y.beta_fast), corr_dim(y.beta_slow)
  if y.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, d - 1)
  if low == high:
    high += 0.001  # avoid a zero-width ramp
  ramp = np.clip((np.arange(d // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  keep = 1.0 - ramp  # 1 where the original (extrapolated) frequency is kept
  freqs = (freqs / np.float32(y.factor)) * (1 - keep) + freqs * keep
  return freqs.astype(np.float32), y.rope_mscale


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq, mscale: float) -> jax.Array:
  """Rotates adjacent pairs (x[2i], x[2i+1]) by positions * inv_freq[i] (official layout).

  x: [B, T, H, d]; positions: [B, T] int. Computed in float32, returned in x.dtype.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, d/2]
  cos = (jnp.cos(angles) * mscale)[:, :, None, :]
  sin = (jnp.sin(angles) * mscale)[:, :, None, :]
  xp = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x0, x1 = xp[..., 0], xp[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)
