"""Small building blocks: Linear, RMSNorm, gated MLP, YaRN rotary embedding.

Every parameter carries logical axis names in its `axes` metadata; `dsv3_jax.sharding` resolves
them to mesh axes. Logical weight axes used in this package:
  vocab, embed (hidden size), q_lora, kv_lora, heads (a fused heads*head_dim axis),
  mlp (dense/shared FFN width), expert, moe_mlp (routed-expert FFN width), None (replicated).

Einsum letters: B batch, T sequence, D hidden, F FFN width, I/O a linear's input/output.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv3_jax.config import ModelConfig

__all__ = ["Linear", "RMSNorm", "MLP", "rope_frequencies", "apply_rope", "INIT_STD"]

INIT_STD = 0.02


def _normal(rngs: nnx.Rngs, shape, dtype):
  return (INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
  """y = x @ kernel, kernel [in, out] (the checkpoint's [out, in] weight, transposed)."""

  def __init__(self, in_features: int, out_features: int, *, axes: tuple, rngs: nnx.Rngs,
               param_dtype=jnp.float32, dtype=jnp.float32):
    self.kernel = nnx.Param(_normal(rngs, (in_features, out_features), param_dtype), axes=axes)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...i,io->...o", x.astype(self.dtype), self.kernel.get_value().astype(self.dtype))


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
