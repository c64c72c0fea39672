"""The MLA latent cache: per layer, per token, the normalised latent c (kv_lora_rank values) and
the rotated shared rope key k_pe (qk_rope_head_dim values). Never per-head K/V.

For DeepSeek-V3 that is 512 + 64 = 576 values per token per layer, against
2 * 128 heads * 192/128 dims for a per-head K/V cache (what transformers keeps).

Layout: two arrays of fixed capacity with per-sequence lengths,
  latent [layers, B, max_len, C]   one row per position (C = 512: whole 128-lane tiles),
  rope   [layers, B, R, max_len]   k_pe TRANSPOSED: positions minor.
Why not one [.., max_len, C + R] row (576 values): 576 is not a multiple of the TPU's 128 lanes,
so XLA:TPU keeps such an array with positions minor and copies the whole cache to row-major
around every `mla_decode` call; [.., max_len, 64] alone has the same problem. These two parts are
row-major in XLA:TPU's own layout, so the kernels read them in place (see
`kernels_pallas.mla_decode`); `tests/test_cache_layout.py` checks the compiled decode step.

Sequences are right padded (sequence b's token at position p sits in row/column p), so a decode
step writes at lengths[b]. Layers are the main decoder layers, then the MTP blocks (when
present). One stack for all layers lets the scanned decoder carry it through its scan, update
the new rows in place (`write_layer_rows`) and hand the kernel the whole stack with the layer
index (no per-layer slice is materialised).

Einsum letters: L layers, B batch, S cache rows (max_len), T new tokens, C kv_lora_rank,
R rope dims.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig

__all__ = ["LatentCache", "init_cache", "cache_values_per_token", "cache_bytes_per_token",
           "write_layer_rows", "write_paged_rows", "write_prefill", "cache_shardings"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LatentCache:
  """latent [layers, B, S, C]: per layer and row the normalised latent c; rope [layers, B, R, S]:
  the rotated k_pe, transposed (row s of sequence b is rope[l, b, :, s]); lengths: int32 [B]
  valid rows per sequence (shared by all layers: the main model and the MTP blocks advance
  together)."""

  latent: jax.Array
  rope: jax.Array
  lengths: jax.Array

  @property
  def num_layers(self) -> int:
    return self.latent.shape[0]

  @property
  def capacity(self) -> int:
    return self.latent.shape[2]

  @property
  def batch(self) -> int:
    return self.latent.shape[1]

  @property
  def kv_lora_rank(self) -> int:
    return self.latent.shape[3]

  @property
  def k_pe(self) -> jax.Array:
    """The rope keys row-major [layers, B, S, R] (a transposed copy, for inspection)."""
    return jnp.swapaxes(self.rope, -1, -2)

  def with_parts(self, latent: jax.Array, rope: jax.Array) -> "LatentCache":
    """A copy with both buffers replaced (same shapes)."""
    return dataclasses.replace(self, latent=latent, rope=rope)

  def with_lengths(self, lengths: jax.Array) -> "LatentCache":
    """A copy with lengths replaced (int32 [B])."""
    return dataclasses.replace(self, lengths=lengths.astype(jnp.int32))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.bfloat16, *,
               mtp_layers: int | None = None) -> LatentCache:
  """A zeroed cache for `cfg.num_hidden_layers` main layers plus `mtp_layers` MTP blocks
  (default: cfg.num_nextn_predict_layers): latent [layers, batch, max_len, kv_lora_rank], rope
  [layers, batch, qk_rope_head_dim, max_len]. Works under jax.eval_shape (nothing allocated)."""
  if batch <= 0 or max_len <= 0:
    raise ValueError(f"init_cache: batch={batch} and max_len={max_len} must be > 0")
  n = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp_layers is None else mtp_layers)
  latent = jnp.zeros((n, batch, max_len, cfg.kv_lora_rank), dtype)
  rope = jnp.zeros((n, batch, cfg.qk_rope_head_dim, max_len), dtype)
  return LatentCache(latent, rope, jnp.zeros((batch,), jnp.int32))


def cache_values_per_token(cfg: ModelConfig) -> int:
  """Values cached per token per layer: kv_lora_rank + qk_rope_head_dim (576 for V3)."""
  return cfg.kv_lora_rank + cfg.qk_rope_head_dim


def cache_bytes_per_token(cfg: ModelConfig, dtype=jnp.bfloat16, *, mtp: bool = False) -> int:
  """Bytes cached per token over all main layers (and the MTP blocks when `mtp`)."""
  layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
  return layers * cache_values_per_token(cfg) * np.dtype(dtype).itemsize


def write_layer_rows(latent: jax.Array, rope: jax.Array, layer, c: jax.Array, k_pe: jax.Array,
                     positions: jax.Array, *, backend: str = "reference",
                     platform: str | None = None) -> tuple[jax.Array, jax.Array]:
  """Writes T new tokens of `layer` (int, may be traced): c [B, T, C] into latent [L, B, S, C]
  rows and k_pe [B, T, R] into rope [L, B, R, S] columns at positions int [B, T] (< S,
  consecutive per sequence). Returns (latent, rope), updated in place inside a scan carry (no
  copy of the layer's buffers): the latent rows by one dynamic-update-slice per sequence (per
  batch shard of the ambient mesh), the rope columns by
  `kernels_pallas.mla_decode.write_rope` (with `backend`/`platform` as for the attention: the
  TPU kernel writes them under the ambient mesh's batch split, see `kernel_map`)."""
  from dsv3_jax.kernels_pallas.mla_decode import write_rope
  from dsv3_jax.sharding import kernel_map
  layer = jnp.asarray(layer, jnp.int32)
  batch = ("batch", None, None)
  # One in-place dynamic-update-slice of T rows per local sequence (rows are consecutive), per
  # batch shard: a scatter of several sequences' rows is counted, and may be laid out, as a
  # pass over the whole cache.
  latent = kernel_map(_write_latent_rows, ((None,) + batch, batch, ("batch", None), None),
                      (None,) + batch, name="latent_write")(latent, c.astype(latent.dtype),
                                                            positions, layer)
  if backend == "reference":
    return latent, write_rope(rope, k_pe, positions, layer=layer, backend="reference")

  def kernel(rope, k_pe, positions, layer):
    return write_rope(rope, k_pe, positions, layer=layer, backend=backend, platform=platform)

  rope = kernel_map(kernel, ((None,) + batch, batch, ("batch", None), None), (None,) + batch,
                    name="mla_rope_write")(rope, k_pe.astype(rope.dtype), positions, layer)
  return latent, rope


def _write_latent_rows(latent, c, positions, layer):
  """latent [L, b, S, C] with c [b, T, C] written at rows positions[i, 0].. of sequence i."""
  def one(i, lat):
    return jax.lax.dynamic_update_slice(lat, c[i][None, None], (layer, i, positions[i, 0], 0))
  return jax.lax.fori_loop(0, c.shape[0], one, latent)


def write_paged_rows(latent: jax.Array, rope: jax.Array, layer, c: jax.Array, k_pe: jax.Array,
                     positions: jax.Array, block_tables: jax.Array, *, split: bool = False,
                     backend: str = "reference", platform: str | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """`write_layer_rows` for a paged cache: latent [L, P, page, C] and rope [L, P, R, page] page
  pools, block_tables int32 [B, pages_per_seq] (logical page i of sequence b is pool page
  block_tables[b, i]). Token t of sequence b (c [B, T, C], k_pe [B, T, R]) goes to row
  positions[b, t] % page of its page; positions past the table go to pool page 0, which the
  serving engine keeps as a scratch page that no sequence reads (so do padding rows: their
  table entries are 0). A scatter (duplicate scratch writes allowed: no unique_indices).
  split: the pools' page dim is split over the batch's mesh axes like the rows (see
  `inference.decode.paged_attention_steps`): each batch shard writes its own rows into its
  own pool shard (page ids taken modulo the local pool, so page 0 is every shard's scratch).
  backend / platform: as for `mla_decode`; where that runs the TPU kernel, the rope columns are
  written in place by `kernels_pallas.mla_decode.tpu_write` (one call per page a row's T
  tokens can touch): a scatter of columns of [.., R, page] makes XLA:TPU keep the whole rope
  pool with R minor and copy it to row-major around every `mla_decode` call, as for the
  contiguous cache (`write_rope`)."""
  from dsv3_jax.kernels_pallas.backend import select
  tpu = backend != "reference" and select(backend, platform=platform).kind == "tpu"
  interpret = tpu and select(backend, platform=platform).interpret
  fn = functools.partial(_write_paged, tpu=tpu, interpret=interpret)
  if not split:
    return fn(latent, rope, layer, c, k_pe, positions, block_tables)
  from dsv3_jax.sharding import kernel_map
  pool, rows = (None, "batch", None, None), ("batch", None, None)
  return kernel_map(fn, (pool, pool, None, rows, rows, ("batch", None),
                                   ("batch", None)), (pool, pool), name="paged_cache_write")(
      latent, rope, jnp.asarray(layer, jnp.int32), c.astype(latent.dtype),
      k_pe.astype(rope.dtype), positions, block_tables)


def _write_paged(latent, rope, layer, c, k_pe, positions, block_tables, *, tpu=False,
                 interpret=False):
  page, n = latent.shape[2], block_tables.shape[1]

  def pool_page(logical):  # [B, ...] logical pages -> pool pages (local when split)
    pages = jnp.take_along_axis(block_tables, jnp.minimum(logical, n - 1), axis=1)
    return jnp.where(logical < n, pages, 0) % latent.shape[1]

  logical = positions // page
  pages, offset = pool_page(logical), positions % page  # [B, T]
  layer = jnp.asarray(layer, jnp.int32)
  latent = _write_latent_pages(latent, layer, c.astype(latent.dtype), positions, pool_page)
  if not tpu:
    rope = rope.at[layer, pages, :, offset].set(k_pe.astype(rope.dtype))  # update [B, T, R]
    return latent, rope
  from dsv3_jax.kernels_pallas.mla_decode import tpu_write
  T = positions.shape[1]
  for j in range(1 + -(-(T - 1) // page)):  # each page the T consecutive tokens can touch
    first = logical[:, :1] + j  # [B, 1]
    rope = tpu_write.write_rope(rope, layer.reshape(1), k_pe.astype(rope.dtype),
                                positions[:, 0] - first[:, 0] * page, seq=pool_page(first)[:, 0],
                                interpret=interpret)
  return latent, rope


def _write_latent_pages(latent, layer, c, positions, pool_page):
  """latent [L, P, page, C] with c [B, T, C] written at rows positions[b, t] of each row's pages
  (pool_page: logical pages [B, k] -> pool pages), by dynamic-update-slices in a loop over the
  rows, in place: one row per sequence for T = 1; else, per page the T consecutive tokens can
  touch, the page read, merged with its new rows and written back. (A scatter of several
  sequences' rows is counted, and may be laid out, as a pass over the whole pool.)"""
  page, (B, T) = latent.shape[2], positions.shape
  segs = 1 + -(-(T - 1) // page)
  first = positions[:, :1] // page  # [B, 1]
  pages = pool_page(first + jnp.arange(segs)[None, :])  # [B, segs]

  def one(b, lat):
    if T == 1:
      return jax.lax.dynamic_update_slice(lat, c[b][None, None],
                                          (layer, pages[b, 0], positions[b, 0] % page, 0))
    for j in range(segs):
      old = jax.lax.dynamic_slice(lat, (layer, pages[b, j], 0, 0), (1, 1, page, lat.shape[3]))
      t = jnp.arange(page) + (first[b, 0] + j) * page - positions[b, 0]  # token of each row
      new = jnp.where(((t >= 0) & (t < T))[:, None], c[b][jnp.clip(t, 0, T - 1)], old[0, 0])
      lat = jax.lax.dynamic_update_slice(lat, new[None, None], (layer, pages[b, j], 0, 0))
    return lat

  return jax.lax.fori_loop(0, B, one, latent)


def write_prefill(latent: jax.Array, rope: jax.Array, start, c: jax.Array, k_pe: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
  """Writes the prompt latents of layers start..start+n-1, c [n, B, T, C] and k_pe [n, B, T, R],
  into rows 0..T-1 of latent [L, B, S, C] / columns 0..T-1 of rope [L, B, R, S]."""
  latent = jax.lax.dynamic_update_slice(latent, c.astype(latent.dtype), (start, 0, 0, 0))
  rope = jax.lax.dynamic_update_slice(rope, jnp.swapaxes(k_pe, -1, -2).astype(rope.dtype),
                                      (start, 0, 0, 0))
  return latent, rope


def cache_shardings(cache: LatentCache, rules, mesh) -> LatentCache:
  """NamedShardings for `cache` (concrete or from jax.eval_shape) on `mesh`: the batch dim of
  latent [L, B, S, C], rope [L, B, R, S] and lengths [B] over the rules' `batch` axes (dims that
  do not divide stay whole); layers, rows and values whole. rules: a
  `dsv3_jax.sharding.ShardingRules`."""
  from dsv3_jax.sharding import activation_sharding
  return jax.tree.map(lambda x: activation_sharding(
      (None, "batch", None, None) if x.ndim == 4 else ("batch",), rules, mesh, x.shape), cache)
