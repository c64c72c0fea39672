"""Prefill and absorbed-MLA decode against the latent cache (pure functions of the model).

Einsum letters: B batch, T new tokens per step, S cache rows, H heads, N qk_nope_head_dim,
R qk_rope_head_dim, C kv_lora_rank, V v_head_dim, D hidden.

Absorbed form (decode): kv_b_proj's kernel [C, H*(N+V)] is split once into W_UK [H, N, C] and
W_UV [H, V, C] (`absorb_weights`). Per new token:
  q_latent = q_nope . W_UK                      [B, H, C]
  scores   = (q_latent . c + q_pe . k_pe) * scale  (C + R cached values per token)
  o_latent = softmax(scores) . c                [B, H, C]
  out      = o_proj(o_latent . W_UV)
This reads 576 cached values per token per layer instead of per-head keys and values. The
attention over the cache runs the kernels' jnp reference attention (`latent_attention`, at the
cache's precision; RuntimeConfig.attention_backend "reference") or
the `kernels_pallas.mla_decode` kernel (any other backend, with RuntimeConfig.kernel_platform),
which reads the layer's rows of the stacked cache parts (latent [L, B, S, C], rope
[L, B, R, S], see `cache.py`) in place, given the layer index (per shard of the ambient mesh:
batch and heads split, see `_sharded_mla_decode`).

Decode runs the model's own decoder block (`DecoderLayer.with_attention`: norms, residuals,
FFN) around the absorbed attention. Prefill runs the model's own (non-absorbed) layers over the
right-padded prompts, which is the compute-efficient form for many query tokens, and writes
each layer's latent (returned by the attention that computed it) into the cache.

Both scan over the model's layer stacks (`DeepseekV3.stacks`): the cache parts ride in the scan
carry and each layer writes only its new rows into them. The routed experts' weight stacks stay
outside the scan and the grouped matmuls read each layer's experts in place at its index
(`LayerStack.split_experts`, `grouped_matmul(layer=...)`), as the cache is read.
Right padding keeps every sequence at positions 0..len-1; causal attention means the padding
behind a sequence never influences it, and the rows it leaves in the cache lie past `lengths`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsv3_jax.inference.cache import LatentCache, write_layer_rows, write_paged_rows, write_prefill
from dsv3_jax.kernels_pallas import mla_decode
from dsv3_jax.kernels_pallas.mla_decode.reference import (latent_attention, mla_decode_reference,
                                                         select_layer)
from dsv3_jax.layers import apply_rope
from dsv3_jax.sharding import current_rules, kernel_map, logical_to_spec

__all__ = ["absorb_weights", "decode_attention", "decode_attention_steps",
           "paged_attention_steps", "prefill", "decode_forward", "mtp_prefill",
           "mtp_decode_forward", "abstract_decode_step"]


def absorb_weights(model) -> dict[str, tuple[jax.Array, ...]]:
  """Splits every layer's kv_b_proj into W_UK [H, N, C] and W_UV [H, V, C] in the compute dtype:
  one entry per layer stack ([count, H, N, C], stacked like the stack's parameters), then one
  per MTP block ([H, N, C]). Call once at load, not per step. An FP8 kv_b_proj
  (from_pretrained(fp8="keep")) is dequantised here, once, before the split."""
  cfg, dt = model.config, model.runtime.dtype
  H, N, V, C = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  uk, uv = [], []
  for block in [st.block for st in model.stacks] + [m.block for m in model.mtp]:
    k = block.self_attn.kv_b_proj.dense_kernel()  # [..., C, H * (N + V)]
    k = k.reshape(*k.shape[:-2], C, H, N + V)
    lead = tuple(range(k.ndim - 3))
    perm = lead + tuple(d + len(lead) for d in (1, 2, 0))  # [..., H, N|V, C]
    uk.append(jnp.transpose(k[..., :N], perm).astype(dt))
    uv.append(jnp.transpose(k[..., N:], perm).astype(dt))
  return {"w_uk": tuple(uk), "w_uv": tuple(uv)}


def decode_attention(q: jax.Array, latent: jax.Array, rope: jax.Array, lengths: jax.Array,
                     scale: float, *, layer=None, backend: str = "reference",
                     platform: str | None = None, gpu_impl: str | None = None) -> jax.Array:
  """One query token per sequence against its latent cache.

  q [B, H, C + R]: q_latent (q_nope . W_UK) then the rotated q_pe; latent [B, S, C] and rope
  [B, R, S] (one layer of a `LatentCache`), or the stacked [L, ...] parts with `layer` (int,
  may be traced); lengths int [B]: rows s < lengths[b] are visible.
  backend "reference" runs `mla_decode.reference.latent_attention`, the masked softmax of the
  kernels' oracle, in the cache's precision (a bfloat16 cache stays bfloat16, probabilities
  rounded to it for the value product, as the kernels do; the oracle itself runs in float32);
  any other value runs `kernels_pallas.mla_decode` with that backend, `platform` and GPU
  flavour `gpu_impl` (see `RuntimeConfig`). Returns o_latent [B, H, C] float32 (softmax in
  float32; zero for a sequence with no visible row).
  """
  if backend != "reference":
    return _sharded_mla_decode(q, latent, rope, lengths, layer, scale, backend=backend,
                               platform=platform, gpu_impl=gpu_impl)
  latent, rope = select_layer(latent, rope, layer)
  return latent_attention(q[:, None], latent, rope, lengths[:, None], scale=scale,
                          value_dtype=latent.dtype)[:, 0]


def decode_attention_steps(q: jax.Array, latent: jax.Array, rope: jax.Array, positions: jax.Array,
                           scale: float, *, layer=None, backend: str = "reference",
                           platform: str | None = None, gpu_impl: str | None = None) -> jax.Array:
  """T new query tokens per sequence (causal among themselves) against the latent cache.

  q [B, T, H, C + R]; latent [B, S, C], rope [B, R, S] (or stacked [L, ...] with `layer`)
  already holding the new tokens' rows; positions int [B, T]: query t of sequence b sees rows
  0..positions[b, t]. Returns [B, T, H, C] float32.

  Reference: `latent_attention` with rows < positions[b, t] + 1 per token. Kernel: ONE `mla_decode` call with
  the multi-token query [B, T, H, C + R] and lengths positions[:, -1] + 1, which reads each
  sequence's cache once for all T tokens (speculative verification costs about one step's
  attention). The kernel's convention (token t sees lengths - (T - 1 - t) rows) equals
  "rows <= positions[b, t]" because the positions are consecutive, positions[b, t] =
  positions[b, 0] + t, as `decode_forward` requires.
  """
  lengths = positions + 1
  if backend == "reference":
    latent, rope = select_layer(latent, rope, layer)
    return latent_attention(q, latent, rope, lengths, scale=scale, value_dtype=latent.dtype)
  return _sharded_mla_decode(q, latent, rope, lengths[:, -1].astype(jnp.int32), layer, scale,
                             backend=backend, platform=platform, gpu_impl=gpu_impl)


def _sharded_mla_decode(q, latent, rope, lengths, layer, scale, *, backend, platform,
                        gpu_impl=None):
  """`mla_decode` run per shard under the ambient mesh (`dsv3_jax.sharding.kernel_map`): q
  [B, (T,) H, C + R] split on batch and heads (act_heads), latent [(L,) B, S, C], rope
  [(L,) B, R, S] and lengths [B] on batch, the layer index replicated; each shard reads only its
  own sequences' cache rows, in place. Returns float32."""
  heads = ("batch",) + (None,) * (q.ndim - 3) + ("act_heads", None)
  cache_axes = ((None,) if layer is not None else ()) + ("batch", None, None)
  if layer is not None:
    layer = jnp.asarray(layer, jnp.int32)

  def kernel(q, latent, rope, lengths, layer):
    return mla_decode(q, latent, rope, lengths, scale=scale, layer=layer, backend=backend,
                      platform=platform, gpu_impl=gpu_impl).astype(jnp.float32)

  return kernel_map(kernel, (heads, cache_axes, cache_axes, ("batch",), None), heads,
                    name="mla_decode")(q, latent, rope, lengths, layer)


def _split_hidden_for_lora(h):
  """h [B, T, D] laid out as q_a_proj / kv_a_proj_with_mqa's input dim (logical "lora_in") is:
  when the rules split that dim (serving on a pod), each device multiplies its D slice of every
  token by its slice of the weights and the [B, T, 1536 | 576] partial sums are reduced, instead
  of every device reading the whole weights (few tokens: moving activations is cheaper)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty:
    return h
  spec = logical_to_spec((None, None, "lora_in"), current_rules(), mesh, h.shape)
  return h if spec == P() else jax.lax.with_sharding_constraint(h, spec)


# Query rows (tokens x local heads) per paged `mla_decode` call: a 64-token prefill chunk with
# DeepSeek-V3's 128 heads is 8192 rows, 84 MB of VMEM in the TPU kernel (~10 KB a row; v5p has
# 64 MB, and 2048 rows still exceeded v5p's scoped VMEM limit, while v6e took them).
PAGED_QUERY_ROWS = 1024


def paged_attention_steps(q: jax.Array, latent: jax.Array, rope: jax.Array,
                          positions: jax.Array, scale: float, *, block_tables: jax.Array, layer,
                          backend: str = "reference", platform: str | None = None,
                          gpu_impl: str | None = None, pool_split: bool = False) -> jax.Array:
  """`decode_attention_steps` over a paged cache: latent [L, P, page, C] and rope
  [L, P, R, page] page pools (stacked over layers, read at `layer`), block_tables int32
  [B, pages_per_seq] (logical page i of sequence b is pool page block_tables[b, i]); q
  [B, T, H, C + R] at consecutive positions [B, T]. Returns [B, T, H, C] float32.
  The reference gathers each sequence's pages; a kernel backend runs `mla_decode`'s paged route
  per shard of the ambient mesh (queries and tables split on the batch).
  pool_split: the pools' page dim is split over the batch's mesh axes like the rows (the serving
  engine's layout on a mesh, `serving.steps.pool_sharding`): the rows of batch shard k hold
  pages of pool shard k only, and each shard reads its local page block_tables[b, i] % (its
  pages). False: the pools are replicated (every shard reads them whole)."""
  lengths = (positions[:, -1] + 1).astype(jnp.int32)
  if backend == "reference" and not pool_split:
    return mla_decode_reference(q.astype(jnp.float32), latent, rope, lengths, scale=scale,
                                block_tables=block_tables, layer=layer).astype(jnp.float32)
  heads = ("batch", None, "act_heads", None)
  layer = jnp.asarray(layer, jnp.int32)

  def kernel(q, latent, rope, lengths, tables, layer):
    tables = tables % latent.shape[1]  # pool ids -> this shard's (no-op for a whole pool)
    if backend == "reference":
      return mla_decode_reference(q.astype(jnp.float32), latent, rope, lengths, scale=scale,
                                  block_tables=tables, layer=layer).astype(jnp.float32)
    # A prefill chunk has T x heads query rows: the kernel holds them all in VMEM, so take at
    # most PAGED_QUERY_ROWS per call (tokens t0..t1-1 see lengths - (T - 1 - t) rows: a call
    # for them passes lengths - (T - t1)).
    T, per = q.shape[1], max(1, PAGED_QUERY_ROWS // q.shape[2])
    out = [mla_decode(q[:, t0:min(T, t0 + per)], latent, rope,
                      lengths - (T - min(T, t0 + per)), scale=scale, layer=layer,
                      block_tables=tables, backend=backend, platform=platform,
                      gpu_impl=gpu_impl).astype(jnp.float32) for t0 in range(0, T, per)]
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=1)

  pool = (None, "batch" if pool_split else None, None, None)
  return kernel_map(kernel, (heads, pool, pool, ("batch",), ("batch", None), None), heads,
                    name="mla_decode_paged")(q, latent, rope, lengths, block_tables, layer)


def _absorbed_attention(attn, w_uk, w_uv, cache, index, h, positions, block_tables=None,
                        pool_split=False):
  """`attn` (an `MLA`) in absorbed form on T new tokens h [B, T, D] (already normed) at
  `positions` [B, T] (consecutive from positions[:, 0]): writes their latent rows into
  cache = (latent [L, B, S, C], rope [L, B, R, S]) at layer `index` (int, may be traced) and
  attends over that layer in place. With block_tables [B, pages_per_seq] the cache parts are
  page pools (`write_paged_rows`, `paged_attention_steps`, split over the batch's mesh axes
  when `pool_split`). Returns (out [B, T, D], cache)."""
  cfg, rt = attn.cfg, attn.rt
  B, T, _ = h.shape
  with jax.named_scope("mla_decode"):
    h = _split_hidden_for_lora(h)
    q_nope, q_pe = attn.queries(h)  # [B, T, H, N], [B, T, H, R]
    q_pe = apply_rope(q_pe, positions, attn.inv_freq, attn.rope_mscale)
    c, k_pe = attn.latent(h, positions)  # [B, T, C], [B, T, R]
    if block_tables is None:
      latent, rope = write_layer_rows(*cache, index, c, k_pe.astype(c.dtype), positions,
                                      backend=rt.attention_backend, platform=rt.kernel_platform)
    else:
      latent, rope = write_paged_rows(*cache, index, c, k_pe.astype(c.dtype), positions,
                                      block_tables, split=pool_split,
                                      backend=rt.attention_backend, platform=rt.kernel_platform)
    dt = latent.dtype
    q_lat = jnp.einsum("bthn,hnc->bthc", q_nope, w_uk.astype(q_nope.dtype))
    q = jnp.concatenate([q_lat.astype(dt), q_pe.astype(dt)], -1)  # [B, T, H, C + R]
    attend = decode_attention_steps if block_tables is None else functools.partial(
        paged_attention_steps, block_tables=block_tables, pool_split=pool_split)
    o = attend(q, latent, rope, positions, cfg.softmax_scale, layer=index,
               backend=rt.attention_backend, platform=rt.kernel_platform,
               gpu_impl=rt.gpu_kernels)  # [B, T, H, C] f32
    o = jnp.einsum("bthc,hvc->bthv", o.astype(h.dtype), w_uv.astype(h.dtype))
    return attn.o_proj(o.reshape(B, T, -1)), (latent, rope)


def _absorbed_layer(layer, w_uk, w_uv, cache, index, x, positions, block_tables=None,
                    expert_layer=None, pool_split=False):
  """One decoder layer on T new tokens per sequence: the model's own block
  (`DecoderLayer.with_attention`: norms, residuals, FFN) around `_absorbed_attention`.
  expert_layer: the index into the whole routed-expert stacks `layer` holds (None: its own).
  Returns (x, cache)."""
  x, _, cache = layer.with_attention(x, lambda h: _absorbed_attention(
      layer.self_attn, w_uk, w_uv, cache, index, h, positions, block_tables, pool_split),
      expert_layer=expert_layer)
  return x, cache


def decode_forward(model, absorbed, cache: LatentCache, tokens: jax.Array, positions: jax.Array,
                   *, block_tables: jax.Array | None = None, logits_at: jax.Array | None = None,
                   pool_split: bool = False):
  """Main model on T new tokens per sequence through the latent cache.

  tokens int32 [B, T] at positions [B, T] (consecutive; row positions[b, 0] onward is written).
  Returns (logits [B, T, V] float32, final normed hidden h^0 [B, T, D], cache). cache.lengths is
  not changed (the caller decides how many of the new rows to keep).
  block_tables int32 [B, pages_per_seq]: cache.latent [L, P, page, C] / cache.rope
  [L, P, R, page] are page pools (the serving engine's paged cache; positions are logical).
  logits_at int [B]: only the logits of token logits_at[b] are computed (logits [B, 1, V]; a
  prefill chunk needs one row, not T x vocabulary).
  pool_split: the page pools are split over the batch's mesh axes (`paged_attention_steps`).
  """
  x, parts = model.embed(tokens), (cache.latent, cache.rope)
  for g, stack in enumerate(model.stacks):
    # The routed-expert stacks stay outside the scan, read in place at the layer's index.
    graphdef, experts, state = stack.split_experts()

    def body(carry, xs, graphdef=graphdef, experts=experts, start=stack.start):
      layer_state, w_uk, w_uv, index = xs
      moe = stack.is_moe
      layer = nnx.merge(graphdef, experts, layer_state) if moe else nnx.merge(graphdef,
                                                                              layer_state)
      x, parts = _absorbed_layer(layer, w_uk, w_uv, carry[1], index, carry[0], positions,
                                 block_tables, expert_layer=index - start if moe else None,
                                 pool_split=pool_split)
      return (x, parts), None

    layers = jnp.arange(stack.start, stack.start + stack.count, dtype=jnp.int32)
    (x, parts), _ = jax.lax.scan(body, (x, parts), (state, absorbed["w_uk"][g],
                                                    absorbed["w_uv"][g], layers))
  hidden = model.norm(x)
  picked = hidden if logits_at is None else hidden[jnp.arange(x.shape[0]), logits_at][:, None]
  return model.head(picked), hidden, cache.with_parts(*parts)


def _mtp_input(mtp_layer, model, next_tokens, h_prev):
  return mtp_layer.eh_proj(jnp.concatenate(
      [mtp_layer.enorm(model.embed(next_tokens)), mtp_layer.hnorm(h_prev)], axis=-1))


def mtp_decode_forward(model, absorbed, cache: LatentCache, next_tokens: jax.Array,
                       h_prev: jax.Array, positions: jax.Array, *,
                       block_tables: jax.Array | None = None, logits_at: jax.Array | None = None,
                       pool_split: bool = False):
  """The first MTP block on T new positions through its latent cache.

  next_tokens int32 [B, T]: t_{i+1} for each position i; h_prev [B, T, D]: the main model's h^0_i
  (final hidden after model.norm, vLLM's choice for serving). Returns (logits [B, T, V] float32,
  predicting t_{i+2}; cache). block_tables / logits_at / pool_split: as for `decode_forward`.
  """
  L, G = model.config.num_hidden_layers, len(model.stacks)
  m = model.mtp[0]
  x = _mtp_input(m, model, next_tokens, h_prev)
  x, parts = _absorbed_layer(m.block, absorbed["w_uk"][G], absorbed["w_uv"][G],
                             (cache.latent, cache.rope), L, x, positions, block_tables,
                             pool_split=pool_split)
  if logits_at is not None:
    x = x[jnp.arange(x.shape[0]), logits_at][:, None]
  return model.head(m.shared_head_norm(x)), cache.with_parts(*parts)


def prefill(model, cache: LatentCache, tokens: jax.Array, lengths: jax.Array):
  """Runs right-padded prompts tokens int32 [B, T] (sequence b's tokens in 0..lengths[b]-1) and
  fills main-layer cache rows 0..T-1. Returns (logits at each sequence's last prompt token
  [B, V] float32, final normed hidden [B, T, D], cache with lengths = `lengths`)."""
  B, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x, parts = model.embed(tokens), (cache.latent, cache.rope)
  for stack in model.stacks:
    x, _, (c, k_pe) = stack(x, positions, return_latent=True, experts_at_layer=True)
    parts = write_prefill(*parts, stack.start, c, k_pe.astype(c.dtype))
  hidden = model.norm(x)
  last = hidden[jnp.arange(B), lengths - 1]  # [B, D]
  return model.head(last), hidden, cache.with_parts(*parts).with_lengths(lengths)


def mtp_prefill(model, cache: LatentCache, tokens: jax.Array, lengths: jax.Array,
                hidden: jax.Array, first: jax.Array):
  """Fills the first MTP block's cache for prompt positions 0..lengths[b]-1.

  Position i takes [Emb(t_{i+1}); h^0_i]; for the last prompt position t_{i+1} is `first` [B],
  the token sampled from the prefill logits. Returns (MTP logits at position lengths[b]-1 [B, V]
  float32, predicting the token after `first`; cache).
  """
  B, T = tokens.shape
  L = model.config.num_hidden_layers
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  rows = jnp.arange(B)
  nxt = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1))).at[rows, lengths - 1].set(first)
  m = model.mtp[0]
  x, _, (c, k_pe) = m.block(_mtp_input(m, model, nxt, hidden), positions, return_latent=True)
  parts = write_prefill(cache.latent, cache.rope, L, c[None], k_pe[None].astype(c.dtype))
  last = m.shared_head_norm(x[rows, lengths - 1])
  return model.head(last), cache.with_parts(*parts)


def abstract_decode_step(graphdef, params, rest, rules, mesh, batch: int, context: int, *,
                         cache_dtype=jnp.bfloat16, mtp_layers: int = 0, tokens: int = 1):
  """One `decode_forward` step (`tokens` new tokens per sequence: 1, or more for speculative
  verification) with abstract, sharded arguments,
  ready to lower ahead of time: the serve decode step `dsv3 plan` compiles, and the one the
  tests that inspect a compiled decode step compile.

  graphdef, params, rest: `nnx.split(model, nnx.Param, ...)` of an abstract model whose leaves
  are `jax.ShapeDtypeStruct`s carrying their shardings on `mesh`; rules: the
  `ShardingRules` they were placed with (trace under `jax.set_mesh(mesh), use_rules(rules)`).
  Returns (step, args, out_shardings):
    step(params, rest, absorbed, cache, tokens, positions) -> (logits [B, T, V] float32, cache);
    args: (params, rest, absorbed W_UK / W_UV [..., H, N|V, C] split over the `heads` rule,
      the `init_cache(cfg, batch, context, cache_dtype, mtp_layers=...)` cache split on batch
      (`cache_shardings`), tokens and positions int32 [B, T] split on batch);
    out_shardings: (logits split on batch and act_vocab, the cache's shardings).
  Jit with `out_shardings` and donate_argnums=(3,) (the cache, updated in place).
  """
  from jax.sharding import NamedSharding

  from dsv3_jax.inference.cache import cache_shardings, init_cache
  from dsv3_jax.sharding import activation_sharding, logical_to_spec
  cfg = nnx.merge(graphdef, params, rest).config
  sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)  # noqa: E731
  cache = jax.eval_shape(lambda: init_cache(cfg, batch, context, cache_dtype,
                                            mtp_layers=mtp_layers))
  cache = jax.tree.map(sds, cache, cache_shardings(cache, rules, mesh))
  absorbed = jax.eval_shape(lambda p, r: absorb_weights(nnx.merge(graphdef, p, r)), params, rest)
  absorbed = jax.tree.map(lambda x: sds(x, NamedSharding(mesh, logical_to_spec(
      (None,) * (x.ndim - 3) + ("heads", None, None), rules, mesh, x.shape))), absorbed)
  new = tokens
  tokens = jax.ShapeDtypeStruct((batch, new), jnp.int32, sharding=activation_sharding(
      ("batch", None), rules, mesh, (batch, new)))

  def step(params, rest, absorbed, cache, tokens, positions):
    logits, _, cache = decode_forward(nnx.merge(graphdef, params, rest), absorbed, cache, tokens,
                                      positions)
    return logits, cache

  logits = activation_sharding(("batch", None, "act_vocab"), rules, mesh,
                               (batch, new, cfg.vocab_size))
  return (step, (params, rest, absorbed, cache, tokens, tokens),
          (logits, jax.tree.map(lambda x: x.sharding, cache)))
