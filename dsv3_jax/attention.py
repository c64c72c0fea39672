"""Multi-head Latent Attention (MLA), training/prefill form.

Einsum letters: B batch, T query positions, S key positions, H heads, K q/k head dim
(nope + rope), V value head dim, D hidden.

q = q_b(RMSNorm(q_a(x))) (or q_proj(x)), split per head into nope | rope.
kv_a(x) = [c_kv | k_pe]; k_pe is ONE rope head shared by all heads; RMSNorm(c_kv) -> kv_b ->
per head [k_nope | v]. Scores use q.k over nope+rope dims; values have v_head_dim.
All attention goes through `attention()`, which the Pallas kernels plug into.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.config import ModelConfig, RuntimeConfig
from dsv3_jax.kernels_pallas import mla_attention, mla_attention_reference, select
from dsv3_jax.layers import Linear, RMSNorm, apply_rope, rope_frequencies

__all__ = ["MLA", "attention"]


def _pad_last(x, multiple: int):
  """Zero-pads the last dim of x up to a multiple of `multiple` (no-op when it already is)."""
  extra = -x.shape[-1] % multiple
  if not extra:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def attention(q, k, v, *, scale: float, segment_ids=None, backend: str = "reference",
              platform: str | None = None, gpu_impl: str | None = None):
  """The model's single attention entry point (training/prefill, causal).

  q: [B, T, H, K]; k: [B, T, H, K]; v: [B, T, H, V]; segment_ids: optional [B, T] int
  (packed sequences attend within their segment). Returns [B, T, H, V] in q.dtype.
  `backend` selects the kernel ("reference", "auto", "pallas", "interpret"); `platform`
  ("tpu", "gpu" or None) is the kernel variant to interpret, or to lower for off-device, and
  `gpu_impl` the GPU flavour (see `dsv3_jax.kernels_pallas.mla_attention`). "reference" is the
  kernels' own oracle, `mla_attention_reference` (float32 scores, softmax and value product):
  the model and the kernel tests share one definition of the causal and segment masks. The
  Pallas kernels need K and V to be multiples of 64: other head dims are zero-padded up to the
  next multiple here (exact: zero q/k dims add nothing to q.k, zero v dims are sliced off;
  gradients flow through the pad), at the cost of the padded work. DeepSeek-V3's 192 / 128 need no padding. Under a mesh (`jax.set_mesh`) the
  kernel runs inside `shard_map` (`dsv3_jax.sharding.kernel_map`): batch split over the
  `ShardingRules().batch` axes, heads over `act_heads`, T whole.
  """
  from dsv3_jax.sharding import kernel_map
  # "auto" on a platform without a kernel resolves to the reference: skip the padding then.
  if backend != "reference" and select(backend, platform=platform).kind != "reference":
    dv = v.shape[-1]

    def kernel(q, k, v, segment_ids):
      seg = None if segment_ids is None else (segment_ids, segment_ids)
      o = mla_attention(_pad_last(q, 64), _pad_last(k, 64), _pad_last(v, 64), scale=scale,
                        causal=True, segment_ids=seg, backend=backend, platform=platform,
                        gpu_impl=gpu_impl)
      return o[..., :dv]

    # One kernel call per shard: batch over the batch axes, heads over act_heads; the sequence
    # stays whole (causal attention reads every earlier key).
    bthd = ("batch", None, "act_heads", None)
    return kernel_map(kernel, (bthd, bthd, bthd, ("batch", None)), bthd,
                      name="mla_attention")(q, k, v, segment_ids)
  seg = None if segment_ids is None else (segment_ids, segment_ids)
  return mla_attention_reference(q, k, v, scale=scale, causal=True, segment_ids=seg)


class MLA(nnx.Module):
  """Multi-head latent attention with q LoRA (or plain q_proj) and a shared rope key head."""

  def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, *, rngs: nnx.Rngs):
    kw = dict(rngs=rngs, param_dtype=rt.param_dtype, dtype=rt.dtype)
    H, D = cfg.num_attention_heads, cfg.hidden_size
    self.cfg, self.rt = cfg, rt
    if cfg.q_lora_rank is None:
      self.q_proj = Linear(D, H * cfg.qk_head_dim, axes=("embed", "heads"), **kw)
    else:
      self.q_a_proj = Linear(D, cfg.q_lora_rank, axes=("lora_in", "q_lora"), **kw)
      self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=cfg.rms_norm_eps, param_dtype=rt.param_dtype)
      self.q_b_proj = Linear(cfg.q_lora_rank, H * cfg.qk_head_dim, axes=("q_lora", "heads"), **kw)
    self.kv_a_proj_with_mqa = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                     axes=("lora_in", "kv_lora"), **kw)
    self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=cfg.rms_norm_eps, param_dtype=rt.param_dtype)
    self.kv_b_proj = Linear(cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                            axes=("kv_lora", "heads"), **kw)
    self.o_proj = Linear(H * cfg.v_head_dim, D, axes=("heads", "embed"), **kw)
    inv_freq, mscale = rope_frequencies(cfg)
    self.inv_freq, self.rope_mscale = tuple(float(f) for f in inv_freq), mscale  # static

  def queries(self, x):
    """x [B, T, D] -> q_nope [B, T, H, nope], q_pe [B, T, H, rope] (rope not yet applied)."""
    cfg = self.cfg
    if cfg.q_lora_rank is None:
      q = self.q_proj(x)
    else:
      q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
    q = q.reshape(*x.shape[:2], cfg.num_attention_heads, cfg.qk_head_dim)
    return q[..., :cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]

  def latent(self, x, positions):
    """x [B, T, D] -> normalised latent c [B, T, kv_lora_rank], rotated k_pe [B, T, rope].

    These 512 + 64 values per token are exactly what the decode cache stores.
    """
    cfg = self.cfg
    kv = self.kv_a_proj_with_mqa(x)
    c, k_pe = kv[..., :cfg.kv_lora_rank], kv[..., cfg.kv_lora_rank:]
    k_pe = apply_rope(k_pe[:, :, None, :], positions, self.inv_freq, self.rope_mscale)[:, :, 0]
    return self.kv_a_layernorm(c), k_pe

  def __call__(self, x, positions, segment_ids=None, *, return_latent: bool = False):
    """x [B, T, D], positions [B, T] -> [B, T, D]; with `return_latent` also (c [B, T, C],
    k_pe [B, T, R]), the normalised latent and rotated rope key the decode cache stores."""
    cfg = self.cfg
    H, N = cfg.num_attention_heads, cfg.qk_nope_head_dim
    with jax.named_scope("mla"):
      q_nope, q_pe = self.queries(x)
      q_pe = apply_rope(q_pe, positions, self.inv_freq, self.rope_mscale)
      c, k_pe = self.latent(x, positions)
      kv = self.kv_b_proj(c).reshape(*x.shape[:2], H, N + cfg.v_head_dim)
      k_nope, v = kv[..., :N], kv[..., N:]
      q = jnp.concatenate([q_nope, q_pe], axis=-1)
      k = jnp.concatenate([k_nope, jnp.broadcast_to(k_pe[:, :, None, :], (*k_pe.shape[:2], H,
                                                                          cfg.qk_rope_head_dim))], -1)
      o = attention(q, k, v, scale=cfg.softmax_scale, segment_ids=segment_ids,
                    backend=self.rt.attention_backend, platform=self.rt.kernel_platform,
                    gpu_impl=self.rt.gpu_kernels)
      out = self.o_proj(o.reshape(*x.shape[:2], H * cfg.v_head_dim))
      return (out, (c, k_pe)) if return_latent else out
