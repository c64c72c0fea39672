"""Absorbed-MLA decode in plain jnp: the oracle for the kernels and their fallback.

Einsum letters: b batch, t new token, h query head, l cache position, c latent dim
(kv_lora_rank), r rope dim.

The latent cache comes in two lane-aligned parts (see the package docstring): `latent`
[b, l, c] (the normalised c_kv: score keys and values) and `rope` [b, r, l] (the rotated k_pe,
TRANSPOSED: positions minor, so a TPU holds it without padding 64 dims to 128 lanes and the
kernels read it in place). Both may carry a leading layers axis selected by `layer`.

One query token per sequence attends to its latent cache:
scores = q[:c] . latent + q[c:] . rope, softmax over positions l < lengths[b],
output = softmax . latent.

Multi-token form (speculative verification): q [b, T, h, c + r] holds T consecutive new tokens
whose cache rows are the last T of each sequence's `lengths[b]` valid rows, so token t sees rows
l < lengths[b] - (T - 1 - t) (`token_lengths`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["mla_decode_reference", "latent_attention", "check_inputs", "combine_splits",
           "gather_pages", "token_lengths", "split_cache", "select_layer"]


def split_cache(fused, kv_lora_rank: int):
  """A fused row layout [..., l, c + r] (latent then rope per row) -> (latent [..., l, c],
  rope [..., r, l]): the layout `mla_decode` reads. Copies; for tests and conversions, not for a
  decode step."""
  return fused[..., :kv_lora_rank], jnp.swapaxes(fused[..., kv_lora_rank:], -1, -2)


def check_inputs(q, latent, rope, lengths, block_tables, layer=None) -> None:
  """Raises ValueError unless the shapes follow the documented layout: q [b, h, c + r] or
  [b, T, h, c + r]; latent [(L,) n, l, c] and rope [(L,) n, r, l] (n = b, or the page count with
  block tables; the leading L exactly when `layer` is given)."""
  lead = 0 if layer is None else 1
  if q.ndim not in (3, 4) or latent.ndim != 3 + lead or rope.ndim != 3 + lead:
    raise ValueError(
        f"expected q [batch, heads, dim] or [batch, tokens, heads, dim], latent "
        f"[{'layers, ' * lead}batch, rows, rank] and rope [{'layers, ' * lead}batch, rope, rows]"
        f"{' (layer given)' if lead else ' (pass layer= for stacked [layers, ...] parts)'}; got "
        f"q {q.shape}, latent {latent.shape}, rope {rope.shape}")
  if latent.shape[:-1] != rope.shape[:-2] + rope.shape[-1:]:
    raise ValueError(f"latent {latent.shape} and rope {rope.shape} (transposed: [..., rope, "
                     f"rows]) disagree on layers, sequences/pages or rows")
  c, r = latent.shape[-1], rope.shape[-2]
  if q.shape[-1] != c + r:
    raise ValueError(f"q dim {q.shape[-1]} != latent {c} + rope {r} (latent {latent.shape}, "
                     f"rope {rope.shape})")
  if lengths.shape != (q.shape[0],):
    raise ValueError(f"lengths must be [batch]={q.shape[0]}; got {lengths.shape}")
  if layer is not None and jnp.ndim(layer) != 0:
    raise ValueError(f"layer must be a scalar index; got shape {jnp.shape(layer)}")
  if block_tables is None:
    if latent.shape[lead] != q.shape[0]:
      raise ValueError(f"cache batch {latent.shape[lead]} != q batch {q.shape[0]}")
  elif block_tables.ndim != 2 or block_tables.shape[0] != q.shape[0]:
    raise ValueError(f"block_tables must be [batch, pages_per_seq]; got {block_tables.shape}")


def select_layer(latent, rope, layer):
  """(latent, rope) of one layer: index the leading layers axis when `layer` is not None."""
  if layer is None:
    return latent, rope
  pick = lambda x: jax.lax.dynamic_index_in_dim(x, jnp.asarray(layer, jnp.int32), 0, False)
  return pick(latent), pick(rope)


def token_lengths(lengths, tokens: int):
  """lengths int [b] (valid rows including all T new tokens) -> [b, T]: rows token t sees,
  lengths[b] - (T - 1 - t), clipped at 0."""
  shift = jnp.arange(tokens, dtype=jnp.int32) - (tokens - 1)
  return jnp.maximum(lengths.astype(jnp.int32)[:, None] + shift[None, :], 0)


def gather_pages(latent, rope, block_tables):
  """Page pools latent [pages, page_size, c], rope [pages, r, page_size] + block tables [b, n]
  -> contiguous latent [b, n * page_size, c], rope [b, r, n * page_size]."""
  b, n = block_tables.shape
  page = latent.shape[1]
  lat = latent[block_tables].reshape(b, n * page, latent.shape[2])
  rp = jnp.moveaxis(rope[block_tables], 2, 1).reshape(b, rope.shape[1], n * page)
  return lat, rp


def mla_decode_reference(q, latent, rope, lengths, *, scale: float, block_tables=None,
                         layer=None):
  """Decode attention against the latent cache, float32 throughout.

  Args:
    q: [batch, heads, c + r] (q_nope already multiplied by W_UK, then q_pe), or
      [batch, T, heads, c + r] for T consecutive new tokens: token t sees rows
      l < lengths[b] - (T - 1 - t) (the new tokens are the last T valid rows).
    latent: [batch, max_len, c], or a page pool [num_pages, page_size, c] with `block_tables`;
      with `layer`, a leading layers axis.
    rope: [batch, r, max_len] (transposed), or a pool [num_pages, r, page_size]; likewise.
    lengths: int32 [batch]: valid cache entries of each sequence (0 <= lengths <= capacity),
      including all T new tokens.
    scale: softmax scale.
    block_tables: optional int32 [batch, pages_per_seq]: logical page -> pool page.
    layer: optional int scalar (may be traced): the layer of stacked latent/rope to read.

  Returns:
    [batch, heads, c] (or [batch, T, heads, c]) in q.dtype; zero for a token that sees no row.
  """
  check_inputs(q, latent, rope, lengths, block_tables, layer)
  latent, rope = select_layer(latent, rope, layer)
  if block_tables is not None:
    latent, rope = gather_pages(latent, rope, block_tables)
  q4 = (q if q.ndim == 4 else q[:, None]).astype(jnp.float32)
  o = latent_attention(q4, latent, rope, token_lengths(lengths, q4.shape[1]), scale=scale,
                       value_dtype=jnp.float32)
  o = o if q.ndim == 4 else o[:, 0]
  return o.astype(q.dtype)


def latent_attention(q, latent, rope, visible, *, scale: float, value_dtype):
  """The masked softmax attention both the kernels' oracle (`mla_decode_reference`) and the
  model's reference decode path (`dsv3_jax.inference.decode_attention`) run.

  q [b, T, h, c + r]; latent [b, l, c]; rope [b, r, l] (one layer, contiguous); visible int
  [b, T]: token t of sequence b sees rows l < visible[b, t]. Scores are dots of the inputs as
  given, accumulated in float32 (a bfloat16 cache is read as bfloat16: no float32 copy of it);
  softmax in float32; the probabilities are rounded to `value_dtype` for the value product
  with `latent` (accumulated in float32). The oracle passes float32 q and value_dtype float32
  (everything in float32); the model passes its cache dtype, the precision the kernels use.
  Returns [b, T, h, c] float32, zero for a token that sees no row.
  """
  c = latent.shape[-1]
  f32 = jnp.float32
  s = (jnp.einsum("bthc,blc->bthl", q[..., :c], latent, preferred_element_type=f32)
       + jnp.einsum("bthr,brl->bthl", q[..., c:], rope, preferred_element_type=f32)) * scale
  valid = jnp.arange(latent.shape[1])[None, None, None, :] < visible[:, :, None, None]
  s = jnp.where(valid, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(l == 0.0, 1.0, l)
  return jnp.einsum("bthl,blc->bthc", p.astype(value_dtype), latent, preferred_element_type=f32)


def combine_splits(o, lse):
  """Merges split-K partials: o [b, splits, h, c] (each normalised), lse [b, splits, h] (natural
  log; -inf for an empty split) -> [b, h, c] float32 (zero when every split is empty)."""
  m = jnp.max(lse, axis=1, keepdims=True)
  w = jnp.exp(lse - jnp.where(jnp.isfinite(m), m, 0.0))  # [b, splits, h]
  total = jnp.sum(w, axis=1)
  o = jnp.einsum("bsh,bshc->bhc", w, o.astype(jnp.float32))
  return o / jnp.where(total == 0.0, 1.0, total)[..., None]
