"""Absorbed-MLA decode in plain jnp: the oracle for the kernels and their fallback.

Einsum letters: b batch, h query head, l cache position, d cache dim (kv_lora_rank latent dims
then the rope dims), c latent dim (the first kv_lora_rank of d).

One query token per sequence attends to its latent cache: scores = q . cache over all d dims,
softmax over positions l < lengths[b], output = softmax . cache[..., :kv_lora_rank].

Multi-token form (speculative verification): q [b, T, h, d] holds T consecutive new tokens
whose cache rows are the last T of each sequence's `lengths[b]` valid rows, so token t (letter t)
sees rows l < lengths[b] - (T - 1 - t) (`token_lengths`).
"""
from __future__ import annotations

import jax.numpy as jnp

__all__ = ["mla_decode_reference", "check_inputs", "combine_splits", "gather_pages",
           "token_lengths"]


def check_inputs(q, cache, lengths, kv_lora_rank: int, block_tables) -> None:
  """Raises ValueError unless the shapes follow the documented layout (q [b, h, d] or
  [b, T, h, d])."""
  if q.ndim not in (3, 4) or cache.ndim != 3:
    raise ValueError(f"expected q [batch, heads, dim] or [batch, tokens, heads, dim] and a 3-d "
                     f"cache; got {q.shape}, {cache.shape}")
  if cache.shape[-1] != q.shape[-1]:
    raise ValueError(f"q and cache dims differ: {q.shape} vs {cache.shape}")
  if not 0 < kv_lora_rank < q.shape[-1]:
    raise ValueError(f"kv_lora_rank={kv_lora_rank} must lie inside the cache dim {q.shape[-1]}")
  if lengths.shape != (q.shape[0],):
    raise ValueError(f"lengths must be [batch]={q.shape[0]}; got {lengths.shape}")
  if block_tables is None:
    if cache.shape[0] != q.shape[0]:
      raise ValueError(f"cache batch {cache.shape[0]} != q batch {q.shape[0]}")
  elif block_tables.ndim != 2 or block_tables.shape[0] != q.shape[0]:
    raise ValueError(f"block_tables must be [batch, pages_per_seq]; got {block_tables.shape}")


def token_lengths(lengths, tokens: int):
  """lengths int [b] (valid rows including all T new tokens) -> [b, T]: rows token t sees,
  lengths[b] - (T - 1 - t), clipped at 0."""
  shift = jnp.arange(tokens, dtype=jnp.int32) - (tokens - 1)
  return jnp.maximum(lengths.astype(jnp.int32)[:, None] + shift[None, :], 0)


def gather_pages(cache, block_tables):
  """Page pool [pages, page_size, d] + block tables [b, n] -> contiguous [b, n * page_size, d]."""
  b, n = block_tables.shape
  return cache[block_tables].reshape(b, n * cache.shape[1], cache.shape[2])


def mla_decode_reference(q, cache, lengths, *, scale: float, kv_lora_rank: int = 512,
                         block_tables=None):
  """Decode attention against the latent cache, float32 throughout.

  Args:
    q: [batch, heads, d] (d = kv_lora_rank + rope dims; q_nope already multiplied by W_UK), or
      [batch, T, heads, d] for T consecutive new tokens: token t sees rows
      l < lengths[b] - (T - 1 - t) (the new tokens are the last T valid rows).
    cache: [batch, max_len, d], or a page pool [num_pages, page_size, d] with `block_tables`.
    lengths: int32 [batch]: valid cache entries of each sequence (0 <= lengths <= capacity),
      including all T new tokens.
    scale: softmax scale.
    kv_lora_rank: latent dims at the front of d (the values).
    block_tables: optional int32 [batch, pages_per_seq]: logical page -> pool page.

  Returns:
    [batch, heads, kv_lora_rank] (or [batch, T, heads, kv_lora_rank]) in q.dtype; zero for a
    token that sees no row.
  """
  check_inputs(q, cache, lengths, kv_lora_rank, block_tables)
  if block_tables is not None:
    cache = gather_pages(cache, block_tables)
  q4 = q if q.ndim == 4 else q[:, None]
  lt = token_lengths(lengths, q4.shape[1])  # [b, T]
  cf = cache.astype(jnp.float32)
  s = jnp.einsum("bthd,bld->bthl", q4.astype(jnp.float32), cf) * scale
  valid = jnp.arange(cache.shape[1])[None, None, None, :] < lt[:, :, None, None]
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bthl,blc->bthc", p, cf[..., :kv_lora_rank]) / jnp.where(l == 0.0, 1.0, l)
  o = o if q.ndim == 4 else o[:, 0]
  return o.astype(q.dtype)


def combine_splits(o, lse):
  """Merges split-K partials: o [b, splits, h, c] (each normalised), lse [b, splits, h] (natural
  log; -inf for an empty split) -> [b, h, c] float32 (zero when every split is empty)."""
  m = jnp.max(lse, axis=1, keepdims=True)
  w = jnp.exp(lse - jnp.where(jnp.isfinite(m), m, 0.0))  # [b, splits, h]
  total = jnp.sum(w, axis=1)
  o = jnp.einsum("bsh,bshc->bhc", w, o.astype(jnp.float32))
  return o / jnp.where(total == 0.0, 1.0, total)[..., None]
