"""Prefill and absorbed-MLA decode against the latent cache (pure functions of the model).

Einsum letters: B batch, T new tokens per step, S cache rows, H heads, N qk_nope_head_dim,
R qk_rope_head_dim, C kv_lora_rank, V v_head_dim, D hidden.

Absorbed form (decode): kv_b_proj's kernel [C, H*(N+V)] is split once into W_UK [H, N, C] and
W_UV [H, V, C] (`absorb_weights`). Per new token:
  q_latent = q_nope . W_UK                      [B, H, C]
  scores   = [q_latent | q_pe] . [c | k_pe] * scale  (one cache row of C + R values per token)
  o_latent = softmax(scores) . c                [B, H, C]
  out      = o_proj(o_latent . W_UV)
This reads 576 cached values per token per layer instead of per-head keys and values. The
attention over the cache runs the jnp einsum (RuntimeConfig.attention_backend "reference") or
the `kernels_pallas.mla_decode` kernel (any other backend, with RuntimeConfig.kernel_platform),
which reads each layer's [B, S, C + R] cache buffer as is (per shard of the ambient mesh:
batch and heads split, see `_sharded_mla_decode`).

Prefill runs the model's own (non-absorbed) layers over the right-padded prompts, which is the
compute-efficient form for many query tokens, and writes each layer's latent into the cache.

Both scan over the model's layer stacks (`DeepseekV3.stacks`): the cache [layers, B, S, C + R]
rides in the scan carry and each layer writes only its new rows into it.
Right padding keeps every sequence at positions 0..len-1; causal attention means the padding
behind a sequence never influences it, and the rows it leaves in the cache lie past `lengths`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flax import nnx

from dsv3_jax.inference.cache import LatentCache, write_layer_rows
from dsv3_jax.kernels_pallas import mla_decode
from dsv3_jax.layers import apply_rope
from dsv3_jax.sharding import kernel_map

__all__ = ["absorb_weights", "decode_attention", "decode_attention_steps", "prefill",
           "decode_forward", "mtp_prefill", "mtp_decode_forward"]


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


def decode_attention(q: jax.Array, cache: jax.Array, lengths: jax.Array, scale: float, *,
                     kv_lora_rank: int, backend: str = "reference",
                     platform: str | None = None) -> jax.Array:
  """One query token per sequence against its latent cache.

  q [B, H, C + R]: q_latent (q_nope . W_UK) then the rotated q_pe; cache [B, S, C + R] (one
  layer of `LatentCache.kv`); lengths int [B]: rows s < lengths[b] are visible.
  backend "reference" runs the jnp einsum below; any other value runs
  `kernels_pallas.mla_decode` with that backend and `platform` (see `RuntimeConfig`).
  Returns o_latent [B, H, C] float32 (softmax in float32; zero for a sequence with no visible
  row).
  """
  C = kv_lora_rank
  if backend != "reference":
    return _sharded_mla_decode(q, cache, lengths, scale, kv_lora_rank=C, backend=backend,
                               platform=platform)
  s = (jnp.einsum("bhc,bsc->bhs", q[..., :C], cache[..., :C], preferred_element_type=jnp.float32)
       + jnp.einsum("bhr,bsr->bhs", q[..., C:], cache[..., C:],
                    preferred_element_type=jnp.float32)) * scale
  valid = jnp.arange(cache.shape[1])[None, None, :] < lengths[:, None, None]
  s = jnp.where(valid, s, -jnp.inf)
  p = jnp.where(valid, jax.nn.softmax(s, axis=-1), 0.0)
  return jnp.einsum("bhs,bsc->bhc", p.astype(cache.dtype), cache[..., :C],
                    preferred_element_type=jnp.float32)


def decode_attention_steps(q: jax.Array, cache: jax.Array, positions: jax.Array, scale: float, *,
                           kv_lora_rank: int, backend: str = "reference",
                           platform: str | None = None) -> jax.Array:
  """T new query tokens per sequence (causal among themselves) against the latent cache.

  q [B, T, H, C + R]; cache [B, S, C + R] already holding the new tokens' rows; positions int
  [B, T]: query t of sequence b sees rows 0..positions[b, t]. Returns [B, T, H, C] float32.

  Reference: vmap over t (shares, does not copy, the cache). Kernel: ONE `mla_decode` call with
  the multi-token query [B, T, H, C + R] and lengths positions[:, -1] + 1, which reads each
  sequence's cache once for all T tokens (speculative verification costs about one step's
  attention). The kernel's convention (token t sees lengths - (T - 1 - t) rows) equals
  "rows <= positions[b, t]" because the positions are consecutive, positions[b, t] =
  positions[b, 0] + t, as `decode_forward` requires.
  """
  lengths = positions + 1
  kw = dict(kv_lora_rank=kv_lora_rank, backend=backend, platform=platform)
  if backend == "reference":
    return jax.vmap(lambda qt, lt: decode_attention(qt, cache, lt, scale, **kw),
                    in_axes=(1, 1), out_axes=1)(q, lengths)
  return _sharded_mla_decode(q, cache, lengths[:, -1].astype(jnp.int32), scale, **kw)


def _sharded_mla_decode(q, cache, lengths, scale, *, kv_lora_rank, backend, platform):
  """`mla_decode` run per shard under the ambient mesh (`dsv3_jax.sharding.kernel_map`): q
  [B, (T,) H, C + R] split on batch and heads (act_heads), cache [B, S, C + R] and lengths [B]
  on batch; each shard reads only its own sequences' cache rows. Returns float32."""
  heads = ("batch",) + (None,) * (q.ndim - 3) + ("act_heads", None)

  def kernel(q, cache, lengths):
    return mla_decode(q, cache, lengths, scale=scale, kv_lora_rank=kv_lora_rank,
                      backend=backend, platform=platform).astype(jnp.float32)

  return kernel_map(kernel, (heads, ("batch", None, None), ("batch",)), heads,
                    name="mla_decode")(q, cache, lengths)


def _absorbed_layer(layer, w_uk, w_uv, kv, index, x, positions):
  """One decoder layer on T new tokens per sequence at `positions` [B, T] (consecutive from
  positions[:, 0]); writes their latent rows into kv [L, B, S, C + R] at layer `index` (int,
  may be traced). Returns (x, kv)."""
  attn, cfg, rt = layer.self_attn, layer.self_attn.cfg, layer.self_attn.rt
  B, T, _ = x.shape
  with jax.named_scope("mla_decode"):
    h = layer.input_layernorm(x)
    q_nope, q_pe = attn.queries(h)  # [B, T, H, N], [B, T, H, R]
    q_pe = apply_rope(q_pe, positions, attn.inv_freq, attn.rope_mscale)
    c, k_pe = attn.latent(h, positions)  # [B, T, C], [B, T, R]
    kv = write_layer_rows(kv, index, jnp.concatenate([c, k_pe.astype(c.dtype)], -1), positions)
    q_lat = jnp.einsum("bthn,hnc->bthc", q_nope, w_uk.astype(q_nope.dtype))
    q = jnp.concatenate([q_lat.astype(kv.dtype), q_pe.astype(kv.dtype)], -1)  # [B, T, H, C+R]
    o = decode_attention_steps(q, kv[index], positions, cfg.softmax_scale,
                               kv_lora_rank=cfg.kv_lora_rank, backend=rt.attention_backend,
                               platform=rt.kernel_platform)  # [B, T, H, C] f32
    o = jnp.einsum("bthc,hvc->bthv", o.astype(x.dtype), w_uv.astype(x.dtype))
    x = x + attn.o_proj(o.reshape(B, T, -1))
  y = layer.mlp(layer.post_attention_layernorm(x))
  if layer.is_moe:
    y = y[0]
  return x + y, kv


def decode_forward(model, absorbed, cache: LatentCache, tokens: jax.Array, positions: jax.Array):
  """Main model on T new tokens per sequence through the latent cache.

  tokens int32 [B, T] at positions [B, T] (consecutive; row positions[b, 0] onward is written).
  Returns (logits [B, T, V] float32, final normed hidden h^0 [B, T, D], cache). cache.lengths is
  not changed (the caller decides how many of the new rows to keep).
  """
  x, kv = model.embed(tokens), cache.kv
  for g, stack in enumerate(model.stacks):
    graphdef, state = nnx.split(stack.block)

    def body(carry, xs, graphdef=graphdef):
      layer_state, w_uk, w_uv, index = xs
      x, kv = _absorbed_layer(nnx.merge(graphdef, layer_state), w_uk, w_uv, carry[1], index,
                              carry[0], positions)
      return (x, kv), None

    layers = jnp.arange(stack.start, stack.start + stack.count, dtype=jnp.int32)
    (x, kv), _ = jax.lax.scan(body, (x, kv), (state, absorbed["w_uk"][g], absorbed["w_uv"][g],
                                              layers))
  hidden = model.norm(x)
  return model.head(hidden), hidden, cache.with_kv(kv)


def _mtp_input(mtp_layer, model, next_tokens, h_prev):
  return mtp_layer.eh_proj(jnp.concatenate(
      [mtp_layer.enorm(model.embed(next_tokens)), mtp_layer.hnorm(h_prev)], axis=-1))


def mtp_decode_forward(model, absorbed, cache: LatentCache, next_tokens: jax.Array,
                       h_prev: jax.Array, positions: jax.Array):
  """The first MTP block on T new positions through its latent cache.

  next_tokens int32 [B, T]: t_{i+1} for each position i; h_prev [B, T, D]: the main model's h^0_i
  (final hidden after model.norm, vLLM's choice for serving). Returns (logits [B, T, V] float32,
  predicting t_{i+2}; cache).
  """
  L, G = model.config.num_hidden_layers, len(model.stacks)
  m = model.mtp[0]
  x = _mtp_input(m, model, next_tokens, h_prev)
  x, kv = _absorbed_layer(m.block, absorbed["w_uk"][G], absorbed["w_uv"][G], cache.kv, L, x,
                          positions)
  return model.head(m.shared_head_norm(x)), cache.with_kv(kv)


def _write_prefill(kv, start: int, c, k_pe):
  """Writes latents c [n, B, T, C], k_pe [n, B, T, R] of layers start..start+n-1 into kv rows
  0..T-1."""
  rows = jnp.concatenate([c, k_pe.astype(c.dtype)], -1).astype(kv.dtype)
  return jax.lax.dynamic_update_slice(kv, rows, (start, 0, 0, 0))


def prefill(model, cache: LatentCache, tokens: jax.Array, lengths: jax.Array):
  """Runs right-padded prompts tokens int32 [B, T] (sequence b's tokens in 0..lengths[b]-1) and
  fills main-layer cache rows 0..T-1. Returns (logits at each sequence's last prompt token
  [B, V] float32, final normed hidden [B, T, D], cache with lengths = `lengths`)."""
  B, T = tokens.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x, kv = model.embed(tokens), cache.kv
  for stack in model.stacks:
    x, _, (c, k_pe) = stack(x, positions, return_latent=True)
    kv = _write_prefill(kv, stack.start, c, k_pe)
  hidden = model.norm(x)
  last = hidden[jnp.arange(B), lengths - 1]  # [B, D]
  return model.head(last), hidden, cache.with_kv(kv).with_lengths(lengths)


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
  kv = _write_prefill(cache.kv, L, c[None], k_pe[None])
  last = m.shared_head_norm(x[rows, lengths - 1])
  return model.head(last), cache.with_kv(kv)
