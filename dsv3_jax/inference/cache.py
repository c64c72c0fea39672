"""The MLA latent cache: per layer, per token, the normalised latent c (kv_lora_rank values) and
the rotated shared rope key k_pe (qk_rope_head_dim values). Never per-head K/V.

For DeepSeek-V3 that is 512 + 64 = 576 values per token per layer, against
2 * 128 heads * 192/128 dims for a per-head K/V cache (what transformers keeps).

Layout: fixed capacity [B, max_len, .] per layer with per-sequence lengths; sequences are right
padded (sequence b's token at position p sits in row p), so a decode step writes at row
lengths[b]. Layers are the main decoder layers, then the MTP blocks (when present).

Einsum letters: B batch, S cache rows (max_len), T new tokens, C kv_lora_rank, R rope dims.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig

__all__ = ["LatentCache", "init_cache", "cache_values_per_token", "cache_bytes_per_token",
           "write_rows"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LatentCache:
  """c: per layer [B, S, C]; k_pe: per layer [B, S, R]; lengths: int32 [B] valid rows per sequence
  (shared by all layers: the main model and the MTP blocks advance together)."""

  c: tuple[jax.Array, ...]
  k_pe: tuple[jax.Array, ...]
  lengths: jax.Array

  @property
  def capacity(self) -> int:
    return self.c[0].shape[1]

  @property
  def batch(self) -> int:
    return self.c[0].shape[0]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16, *,
               mtp_layers: int | None = None) -> LatentCache:
  """A zeroed cache for `cfg.num_hidden_layers` main layers plus `mtp_layers` MTP blocks
  (default: cfg.num_nextn_predict_layers). Works under jax.eval_shape (nothing allocated)."""
  if batch <= 0 or max_len <= 0:
    raise ValueError(f"init_cache: batch={batch} and max_len={max_len} must be > 0")
  n = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp_layers is None else mtp_layers)
  c = tuple(jnp.zeros((batch, max_len, cfg.kv_lora_rank), dtype) for _ in range(n))
  k_pe = tuple(jnp.zeros((batch, max_len, cfg.qk_rope_head_dim), dtype) for _ in range(n))
  return LatentCache(c, k_pe, jnp.zeros((batch,), jnp.int32))


def cache_values_per_token(cfg: ModelConfig) -> int:
  """Values cached per token per layer: kv_lora_rank + qk_rope_head_dim (576 for V3)."""
  return cfg.kv_lora_rank + cfg.qk_rope_head_dim


def cache_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16, *, mtp: bool = False) -> int:
  """Bytes cached per token over all main layers (and the MTP blocks when `mtp`)."""
  layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
  return layers * cache_values_per_token(cfg) * np.dtype(dtype).itemsize


def write_rows(buf: jax.Array, new: jax.Array, offsets: jax.Array) -> jax.Array:
  """buf [B, S, X], new [B, T, X], offsets int [B] -> buf with rows offsets[b]..+T-1 replaced.

  The caller guarantees offsets[b] + T <= S (dynamic_update_slice would otherwise clamp the
  start and overwrite valid rows); `Generator` sizes the cache so this holds.
  """
  return jax.vmap(lambda b, n, o: jax.lax.dynamic_update_slice(b, n.astype(b.dtype), (o, 0)))(
      buf, new, offsets)
