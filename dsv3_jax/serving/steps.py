"""The serving engine's compiled steps over the paged latent cache: one function for prefill
chunks and decode steps (the model's own `decode_forward` with block tables), the MTP-speculative
variant, and per-row sampling (every request brings its own temperature / top-k / top-p / seed).

Einsum letters: B batch rows of a step, T tokens per row, V vocabulary, P pages per row (the
block-table width), S slots (the engine's max batch, + 1 scratch slot for padding rows).

Every input is a fixed-shape array, so one compiled program serves every step of a given
(B, T, P) bucket: tokens int32 [B, T] fed at positions start[b] + t; tables int32 [B, P]
(0 = the scratch page); pick int32 [B]: the token whose logits are sampled (the last prompt token
of a final prefill chunk, 0 for a decode step).

`jit_step` is the one place these functions are jitted (shardings, donation): the engine
compiles through it, and so does `dsv3 plan --mode serve` (with abstract arguments from
`abstract_rows`). On a mesh the page pools are split over the batch's mesh axes when
`pool_split` (see `pool_sharding`): row block k of a step then holds only pages of pool shard k.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dsv3_jax.inference.cache import LatentCache
from dsv3_jax.inference.decode import decode_forward, mtp_decode_forward
from dsv3_jax.inference.speculative import rejection_sample

if TYPE_CHECKING:
  from dsv3_jax.sharding import ShardingRules

__all__ = ["RowSampling", "row_keys", "row_probabilities", "sample_rows", "forward_step",
           "decode_steps", "speculative_prefill_step", "speculative_decode_step",
           "serving_rules", "batch_shards", "PoolLayout", "pool_layout", "pool_sharding",
           "jit_step", "abstract_rows"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RowSampling:
  """Per-row sampling parameters (a pytree of [B] arrays): temperature float32 (0 = greedy),
  top_k int32 (0 = off), top_p float32 (1 = off), seed uint32, counter int32 (tokens the request
  has generated so far: the key of a row is fold_in(key(seed), counter), so a request samples the
  same tokens whatever else is in the batch)."""

  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  seed: jax.Array
  counter: jax.Array


def row_keys(s: RowSampling, salt: int = 0) -> jax.Array:
  """One PRNG key per row [B]: fold_in(fold_in(key(seed), counter), salt)."""
  return jax.vmap(lambda seed, n: jax.random.fold_in(
      jax.random.fold_in(jax.random.key(seed), n), salt))(s.seed, s.counter)


def _sorted_support(logits: jax.Array, s: RowSampling):
  """logits [B, V] -> (scaled logits sorted descending with -inf where top-k/top-p cut [B, V],
  their token ids [B, V]); the order of `inference.sampling.candidates` (ties: lower id first)."""
  V = logits.shape[-1]
  t = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
  scaled = logits.astype(jnp.float32) / t
  ids = jnp.argsort(-scaled, axis=-1, stable=True).astype(jnp.int32)
  vals = jnp.take_along_axis(scaled, ids, axis=-1)
  rank = jnp.arange(V)[None, :]
  keep = (s.top_k[:, None] <= 0) | (rank < s.top_k[:, None])
  vals = jnp.where(keep, vals, -jnp.inf)
  p = jax.nn.softmax(vals, axis=-1)
  before = jnp.cumsum(p, axis=-1) - p
  keep = (before < s.top_p[:, None]) | (rank == 0)
  return jnp.where(keep, vals, -jnp.inf), ids


def row_probabilities(logits: jax.Array, s: RowSampling) -> jax.Array:
  """The distribution each row samples from, float32 [B, V] (one-hot argmax for greedy rows)."""
  vals, ids = _sorted_support(logits, s)
  rows = jnp.arange(logits.shape[0])[:, None]
  p = jnp.zeros(logits.shape, jnp.float32).at[rows, ids].set(jax.nn.softmax(vals, axis=-1))
  greedy = jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
  return jnp.where((s.temperature > 0)[:, None], p, greedy)


def sample_rows(logits: jax.Array, s: RowSampling, salt: int = 0) -> jax.Array:
  """logits [B, V] -> token ids int32 [B]: argmax where temperature == 0, else a draw from the
  row's top-k / top-p support at its temperature with the row's key."""
  greedy = jnp.argmax(logits, -1).astype(jnp.int32)

  def draw(_):
    vals, ids = _sorted_support(logits, s)
    j = jax.vmap(jax.random.categorical)(row_keys(s, salt), vals)
    drawn = jnp.take_along_axis(ids, j[:, None], axis=-1)[:, 0]
    return jnp.where(s.temperature > 0, drawn, greedy)

  # The sort and the per-row keys cost more than a small model's step: skip them when every
  # row of the step is greedy.
  return jax.lax.cond(jnp.any(s.temperature > 0), draw, lambda _: greedy, None)


def _paged_forward(model, absorbed, latent, rope, tokens, start, tables, pool_split, **kw):
  """`decode_forward` on tokens [B, T] fed at positions start[b] + t through the page pools.
  Returns (logits, hidden, positions [B, T], cache)."""
  B, T = tokens.shape
  positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
  cache = LatentCache(latent, rope, jnp.zeros((B,), jnp.int32))
  logits, hidden, cache = decode_forward(model, absorbed, cache, tokens, positions,
                                         block_tables=tables, pool_split=pool_split, **kw)
  return logits, hidden, positions, cache


def forward_step(graphdef, state, absorbed, latent, rope, tokens, start, tables, pick,
                 sampling: RowSampling, *, pool_split: bool = False):
  """A prefill chunk ([B, T] prompt tokens) or a decode step (T = 1): writes the tokens' latent
  rows into the page pools latent [L, pages, page, C] / rope [L, pages, R, page] and samples one
  token per row from the logits at `pick`. pool_split: see `pool_sharding`.
  Returns (latent, rope, tokens int32 [B])."""
  model = nnx.merge(graphdef, state)
  logits, _, _, cache = _paged_forward(model, absorbed, latent, rope, tokens, start, tables,
                                       pool_split, logits_at=pick)
  return cache.latent, cache.rope, sample_rows(logits[:, 0], sampling)


def decode_steps(graphdef, state, absorbed, latent, rope, last, start, tables,
                 sampling: RowSampling, *, steps: int, pool_split: bool = False):
  """`steps` decode steps in one call (one host round trip for several tokens): row b feeds
  last[b] at position start[b], samples, feeds that at start[b] + 1, ... (keys advance with the
  counter as one step per call would). Rows that finish earlier (a stop id, max_tokens) are
  cut by the host; their extra rows lie past their length or on the scratch page.
  Returns (latent, rope, tokens int32 [B, steps])."""
  model = nnx.merge(graphdef, state)
  B = last.shape[0]

  def body(carry, _):
    latent, rope, tok, pos, counter = carry
    cache = LatentCache(latent, rope, jnp.zeros((B,), jnp.int32))
    logits, _, cache = decode_forward(model, absorbed, cache, tok[:, None], pos[:, None],
                                      block_tables=tables, pool_split=pool_split)
    nxt = sample_rows(logits[:, 0], dataclasses.replace(sampling, counter=counter))
    return (cache.latent, cache.rope, nxt, pos + 1, counter + 1), nxt

  (latent, rope, *_), toks = jax.lax.scan(
      body, (latent, rope, last, start, sampling.counter), None, length=steps)
  return latent, rope, toks.T


def _draft(mtp_logits, s: RowSampling):
  """MTP logits [B, V] -> (draft [B], its distribution [B, V])."""
  return sample_rows(mtp_logits, s, salt=3), row_probabilities(mtp_logits, s)


def speculative_prefill_step(graphdef, state, absorbed, latent, rope, q_buf, tokens, next_tokens,
                             start, tables, pick, slots, final, sampling: RowSampling, *,
                             pool_split: bool = False):
  """A prefill chunk with MTP: the main model as `forward_step`, then the MTP block over the
  same positions (input [Emb(t_{i+1}); h^0_i]; next_tokens [B, T] are the prompt's t_{i+1},
  and for the last prompt token of a `final` [B] chunk the token sampled here) filling its
  cache layer. The draft for the token after the sampled one and its distribution (stored in
  q_buf [S, V] at `slots` [B]) come from the MTP logits at `pick`.
  Returns (latent, rope, q_buf, first [B], draft [B])."""
  model = nnx.merge(graphdef, state)
  T = tokens.shape[1]
  logits, hidden, positions, cache = _paged_forward(model, absorbed, latent, rope, tokens, start,
                                                    tables, pool_split, logits_at=pick)
  first = sample_rows(logits[:, 0], sampling)
  at_pick = (jnp.arange(T)[None, :] == pick[:, None]) & final[:, None]
  nxt = jnp.where(at_pick, first[:, None], next_tokens)
  mtp_logits, cache = mtp_decode_forward(model, absorbed, cache, nxt, hidden, positions,
                                         block_tables=tables, logits_at=pick,
                                         pool_split=pool_split)
  draft, q = _draft(mtp_logits[:, 0], sampling)
  return cache.latent, cache.rope, q_buf.at[slots].set(q), first, draft


def speculative_decode_step(graphdef, state, absorbed, latent, rope, q_buf, last, draft, start,
                            tables, slots, sampling: RowSampling, *, pool_split: bool = False):
  """One MTP-speculative step per row (see `inference.speculative`): the main model verifies
  [last, draft] at positions start, start + 1; greedy rows accept iff the argmax equals the
  draft, sampled rows by the rejection rule against the draft's distribution q_buf[slot]; the
  MTP block then drafts the next token. Returns (latent, rope, q_buf, first [B], bonus [B],
  accepted bool [B], next draft [B]): a row emits `first`, and `bonus` too when accepted."""
  model = nnx.merge(graphdef, state)
  fed = jnp.stack([last, draft], axis=1)
  logits, hidden, positions, cache = _paged_forward(model, absorbed, latent, rope, fed, start,
                                                    tables, pool_split)
  greedy = sampling.temperature <= 0
  k_acc, k_res = jax.vmap(lambda k: tuple(jax.random.split(k)))(row_keys(sampling, 1))
  p0 = row_probabilities(logits[:, 0], sampling)
  sampled, acc_s = jax.vmap(lambda ka, kr, p, q, d: tuple(
      x[0] for x in rejection_sample(ka, kr, p[None], q[None], d[None])))(
          k_acc, k_res, p0, q_buf[slots], draft)
  arg0 = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
  first = jnp.where(greedy, arg0, sampled)
  accept = jnp.where(greedy, arg0 == draft, acc_s)
  bonus = sample_rows(logits[:, 1], sampling, salt=2)
  new = jnp.stack([first, bonus], axis=1)
  mtp_logits, cache = mtp_decode_forward(model, absorbed, cache, new, hidden, positions,
                                         block_tables=tables, pool_split=pool_split)
  nxt, q = _draft(jnp.where(accept[:, None], mtp_logits[:, 1], mtp_logits[:, 0]), sampling)
  return cache.latent, cache.rope, q_buf.at[slots].set(q), first, bonus, accept, nxt


# Compilation: the one builder of the engine's programs (shared with `dsv3 plan --mode serve`).
def serving_rules(mesh) -> ShardingRules:
  """The rules the engine (so `dsv3 serve --mesh`) places the model with when given none: the
  defaults on a mesh with a tensor axis; else the pod rules: the dense head / FFN / vocab dims
  over `expert`, and the hidden-size input of q_a / kv_a over every weight-sharding axis, so
  that every weight is split (ZeRO-3 over fsdp x expert) and each device reads 1/n of them."""
  from dsv3_jax.sharding import rules_for_mesh
  return rules_for_mesh(mesh, serve=True)


def batch_shards(mesh, rules) -> int:
  """How many shards the rows of a step are split into (the mesh axes of the `batch` rule)."""
  sizes = dict(zip(mesh.axis_names, map(int, mesh.axis_sizes)))
  return math.prod(sizes.get(a, 1) for a in rules.mesh_axes("batch"))


@dataclasses.dataclass(frozen=True)
class PoolLayout:
  """How the engine lays its page pool and step rows over the batch shards. split: the pool is
  split (`pool_sharding`); shards: 1 unless split; shard_pages: usable pages per shard (each
  shard has one more, its scratch page: the pool holds shards * (shard_pages + 1));
  shard_rows: most requests per shard; row_buckets: rows per shard a step is padded to (a step
  has shards x a row bucket rows)."""

  split: bool
  shards: int
  shard_pages: int
  shard_rows: int
  row_buckets: tuple[int, ...]

  @property
  def pool_pages(self) -> int:
    return self.shards * (self.shard_pages + 1)


def pool_layout(n_shards: int, num_pages: int, max_batch: int, pages_per_seq: int,
                batch_buckets, split: bool | None = None) -> PoolLayout:
  """The engine's `PoolLayout` for n_shards batch shards (`batch_shards`), a pool of num_pages
  usable pages, max_batch requests, pages_per_seq pages of a full context and the (global)
  batch_buckets. split None: split when n_shards > 1 and each shard still holds pages_per_seq
  pages (a full-context request)."""
  if split is None:
    split = -(-num_pages // n_shards) >= pages_per_seq
  split = bool(split) and n_shards > 1
  shards = n_shards if split else 1
  return PoolLayout(split, shards, -(-num_pages // shards), -(-max_batch // shards),
                    tuple(sorted({-(-b // shards) for b in batch_buckets})))


def pool_sharding(mesh, rules, split: bool) -> NamedSharding:
  """Sharding of the page pools latent [L, pages, page, C] / rope [L, pages, R, page]. split:
  the page dim over the batch's mesh axes, n pages per shard (pool shard k holds pages
  k * n .. k * n + n - 1, page k * n its scratch page; the engine keeps a request's rows in row
  block k of every step and its pages in pool shard k, and the steps read page ids modulo n);
  else replicated."""
  axes = tuple(a for a in rules.mesh_axes("batch") if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(None, axes) if split and axes else PartitionSpec())


def jit_step(fn, graphdef, state_shardings, absorbed_shardings, pool_shardings, row_sharding,
             n_rows: int, **statics):
  """jax.jit of fn(graphdef, state, absorbed, *pools, *rows, **statics) (`forward_step`,
  `decode_steps`, ...) as the engine runs it: state and absorbed weights in their shardings,
  the page pools (latent, rope[, q_buf]) in `pool_shardings` and donated (updated in place),
  the n_rows per-row arguments (each an array or RowSampling) in `row_sharding`. Lower under
  `jax.set_mesh(mesh), use_rules(rules)`."""
  n_pool = len(pool_shardings)
  return jax.jit(functools.partial(fn, graphdef, **statics),
                 in_shardings=(state_shardings, absorbed_shardings) + tuple(pool_shardings)
                 + (row_sharding,) * n_rows,
                 donate_argnums=tuple(range(2, 2 + n_pool)))


def abstract_rows(kind: str, batch: int, tokens: int, pages: int, sharding=None) -> tuple:
  """The per-row arguments of a step, abstract (jax.ShapeDtypeStruct with `sharding`), in the
  order and dtypes the engine passes them: kind "prefill" (`forward_step`: tokens [B, T], start,
  tables [B, P], pick, sampling) or "decode" (`decode_steps`: last, start, tables, sampling)."""
  sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=sharding)  # noqa: E731
  b = lambda dt: sds((batch,), dt)  # noqa: E731
  sampling = RowSampling(b(jnp.float32), b(jnp.int32), b(jnp.float32), b(jnp.uint32),
                         b(jnp.int32))
  tables = sds((batch, pages), jnp.int32)
  if kind == "prefill":
    return (sds((batch, tokens), jnp.int32), b(jnp.int32), tables, b(jnp.int32), sampling)
  if kind == "decode":
    return (b(jnp.int32), b(jnp.int32), tables, sampling)
  raise ValueError(f"abstract_rows: kind must be 'prefill' or 'decode', got {kind!r}")
