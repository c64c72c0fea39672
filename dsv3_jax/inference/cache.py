"""The MLA latent cache: per layer, per token, the normalised latent c (kv_lora_rank values) then
the rotated shared rope key k_pe (qk_rope_head_dim values), in one row. Never per-head K/V.

For DeepSeek-V3 that is 512 + 64 = 576 values per token per layer, against
2 * 128 heads * 192/128 dims for a per-head K/V cache (what transformers keeps).

Layout: one array [layers, B, max_len, C + R] (fixed capacity) with per-sequence lengths;
sequences are right padded (sequence b's token at position p sits in row p), so a decode step
writes at row lengths[b]. Layers are the main decoder layers, then the MTP blocks (when present).
One array for all layers lets the scanned decoder carry it through its scan and update the new
rows in place (`write_layer_rows`).

Einsum letters: L layers, B batch, S cache rows (max_len), T new tokens, C kv_lora_rank,
R rope dims.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig

__all__ = ["LatentCache", "init_cache", "cache_values_per_token", "cache_bytes_per_token",
           "write_layer_rows", "cache_shardings"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LatentCache:
  """kv [layers, B, S, C + R]: per layer and row the normalised latent c in [..., :C], then the
  rotated k_pe in [..., C:] (the layout the `mla_decode` kernel and FlashMLA read as is);
  lengths: int32 [B] valid rows per sequence (shared by all layers: the main model and the MTP
  blocks advance together); kv_lora_rank: C (static pytree metadata)."""

  kv: jax.Array
  lengths: jax.Array
  kv_lora_rank: int = dataclasses.field(metadata=dict(static=True))

  @property
  def num_layers(self) -> int:
    return self.kv.shape[0]

  @property
  def capacity(self) -> int:
    return self.kv.shape[2]

  @property
  def batch(self) -> int:
    return self.kv.shape[1]

  @property
  def c(self) -> jax.Array:
    """The latent part [layers, B, S, C] (a slice of `kv`, for inspection)."""
    return self.kv[..., :self.kv_lora_rank]

  @property
  def k_pe(self) -> jax.Array:
    """The rope-key part [layers, B, S, R] (a slice of `kv`)."""
    return self.kv[..., self.kv_lora_rank:]

  def with_kv(self, kv: jax.Array) -> "LatentCache":
    """A copy with the buffer replaced (same shape)."""
    return dataclasses.replace(self, kv=kv)

  def with_lengths(self, lengths: jax.Array) -> "LatentCache":
    """A copy with lengths replaced (int32 [B])."""
    return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16, *,
               mtp_layers: int | None = None) -> LatentCache:
  """A zeroed cache for `cfg.num_hidden_layers` main layers plus `mtp_layers` MTP blocks
  (default: cfg.num_nextn_predict_layers): kv [layers, batch, max_len, kv_lora_rank + rope dims].
  Works under jax.eval_shape (nothing allocated)."""
  if batch <= 0 or max_len <= 0:
    raise ValueError(f"init_cache: batch={batch} and max_len={max_len} must be > 0")
  n = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp_layers is None else mtp_layers)
  d = cache_values_per_token(cfg)
  kv = jnp.zeros((n, batch, max_len, d), dtype)
  return LatentCache(kv, jnp.zeros((batch,), jnp.int32), cfg.kv_lora_rank)


def cache_values_per_token(cfg: ModelConfig) -> int:
  """Values cached per token per layer: kv_lora_rank + qk_rope_head_dim (576 for V3)."""
  return cfg.kv_lora_rank + cfg.qk_rope_head_dim


def cache_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16, *, mtp: bool = False) -> int:
  """Bytes cached per token over all main layers (and the MTP blocks when `mtp`)."""
  layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
  return layers * cache_values_per_token(cfg) * np.dtype(dtype).itemsize


def write_layer_rows(kv: jax.Array, layer, new: jax.Array, positions: jax.Array) -> jax.Array:
  """kv [L, B, S, X], new [B, T, X] rows for `layer` (int, may be traced) at positions int
  [B, T] -> kv with those rows replaced: a scatter of B*T rows, in place inside a scan carry
  (no copy of the layer's buffer). Positions must be < S."""
  B, T = positions.shape
  b = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
  return kv.at[layer, b, positions].set(new.astype(kv.dtype), unique_indices=True)


def cache_shardings(cache: LatentCache, rules, mesh) -> LatentCache:
  """NamedShardings for `cache` (concrete or from jax.eval_shape) on `mesh`: the batch dim of
  kv [L, B, S, X] and of lengths [B] over the rules' `batch` axes (dims that do not divide stay
  whole); layers, rows and values whole. rules: a `dsv3_jax.sharding.ShardingRules`."""
  from dsv3_jax.sharding import activation_sharding
  return jax.tree.map(lambda x: activation_sharding(
      (None, "batch", None, None) if x.ndim == 4 else ("batch",), rules, mesh, x.shape), cache)
