"""The DeepSeek-V3 transformer: decoder blocks, final norm, untied head, MTP modules.

Einsum letters: B batch, T sequence, D hidden, V vocabulary.

Block: x += attn(norm(x)); x += ffn(norm(x)), the FFN dense for layers < first_k_dense_replace
(and layers off the moe_layer_freq grid), MoE otherwise.

MTP depth k (1..num_nextn_predict_layers), checkpoint layer index num_hidden_layers + k - 1:
  h^k_i = Block_k(eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)]))   (embedding FIRST)
  logits^k_i = head(shared_head.norm(h^k_i)), predicting t_{i+k+1}.
h^0 is the main model's final hidden state AFTER model.norm, the choice vLLM makes when serving
the official checkpoint; training uses the same h^0 so that a model trained here serves the same
way. Embedding and head are shared with the main model (the checkpoint's copies are checked
equal on load).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dsv3_jax.attention import MLA
from dsv3_jax.config import ModelConfig, RuntimeConfig
from dsv3_jax.layers import INIT_STD, MLP, Linear, RMSNorm
from dsv3_jax.moe import MoE

__all__ = ["DecoderLayer", "MTPLayer", "DeepseekV3", "ModelOutput"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
  """logits [B, T, V] float32; mtp_logits [depth, B, T, V] float32 or None (position i of depth k
  predicts token i+k+1); hidden [B, T, D] the final normalised hidden state (MTP's h^0);
  router_stats: one dict per MoE layer in order (main layers, then MTP blocks), see `MoE`."""

  logits: jax.Array
  mtp_logits: jax.Array | None
  hidden: jax.Array
  router_stats: list[dict[str, Any]]


class DecoderLayer(nnx.Module):

  def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, layer: int, *, rngs: nnx.Rngs):
    eps = cfg.rms_norm_eps
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=eps, param_dtype=rt.param_dtype)
    self.self_attn = MLA(cfg, rt, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=eps, param_dtype=rt.param_dtype)
    if cfg.is_moe_layer(layer):
      self.mlp = MoE(cfg, rt, rngs=rngs)
    else:
      self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, param_dtype=rt.param_dtype,
                     dtype=rt.dtype)
    self.is_moe = cfg.is_moe_layer(layer)

  def __call__(self, x, positions, segment_ids=None):
    """x [B, T, D] -> (x [B, T, D], router stats dict or None)."""
    x = x + self.self_attn(self.input_layernorm(x), positions, segment_ids)
    h = self.post_attention_layernorm(x)
    if self.is_moe:
      y, stats = self.mlp(h)
    else:
      y, stats = self.mlp(h), None
    return x + y, stats


class MTPLayer(nnx.Module):
  """One multi-token-prediction depth (names as in the checkpoint's layer num_hidden_layers+k-1)."""

  def __init__(self, cfg: ModelConfig, rt: RuntimeConfig, depth: int, *, rngs: nnx.Rngs):
    eps, D = cfg.rms_norm_eps, cfg.hidden_size
    self.enorm = RMSNorm(D, eps=eps, param_dtype=rt.param_dtype)
    self.hnorm = RMSNorm(D, eps=eps, param_dtype=rt.param_dtype)
    self.eh_proj = Linear(2 * D, D, axes=(None, "embed"), rngs=rngs, param_dtype=rt.param_dtype,
                          dtype=rt.dtype)
    self.block = DecoderLayer(cfg, rt, cfg.num_hidden_layers + depth - 1, rngs=rngs)
    self.shared_head_norm = RMSNorm(D, eps=eps, param_dtype=rt.param_dtype)

  def __call__(self, emb_next, h_prev, positions, segment_ids=None):
    """emb_next: Emb(t_{i+k}) [B, T, D]; h_prev: h^{k-1} [B, T, D] -> (h^k, normed h^k, stats)."""
    x = self.eh_proj(jnp.concatenate([self.enorm(emb_next), self.hnorm(h_prev)], axis=-1))
    h, stats = self.block(x, positions, segment_ids)
    return h, self.shared_head_norm(h), stats


class DeepseekV3(nnx.Module):
  """DeepSeek-V3 causal LM. `m(tokens)` -> logits float32 [B, T, V] for int32 tokens [B, T]."""

  def __init__(self, cfg: ModelConfig, rt: RuntimeConfig | None = None, *, rngs: nnx.Rngs):
    rt = rt or RuntimeConfig()
    self.config, self.runtime = cfg, rt
    emb = INIT_STD * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size), jnp.float32)
    self.embed_tokens = nnx.Param(emb.astype(rt.param_dtype), axes=("vocab", "embed"))
    self.layers = nnx.List([DecoderLayer(cfg, rt, i, rngs=rngs) for i in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=rt.param_dtype)
    self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs,
                          param_dtype=rt.param_dtype, dtype=rt.dtype)
    self.mtp = nnx.List([MTPLayer(cfg, rt, k + 1, rngs=rngs)
                         for k in range(cfg.num_nextn_predict_layers)])

  @property
  def cfg(self) -> ModelConfig:
    return self.config

  def embed(self, tokens: jax.Array) -> jax.Array:
    return jnp.take(self.embed_tokens.get_value(), tokens, axis=0).astype(self.runtime.dtype)

  def head(self, h: jax.Array) -> jax.Array:
    return self.lm_head(h).astype(jnp.float32)

  def forward(self, tokens, *, positions=None, segment_ids=None, mtp: bool = False) -> ModelOutput:
    """Full forward.

    tokens: int32 [B, T]; positions: int [B, T] (default 0..T-1); segment_ids: int [B, T] for packed
    sequences (attention stays within a segment; positions should restart per segment);
    mtp: also run the MTP modules (training / speculative drafting).
    """
    B, T = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x = self.embed(tokens)
    stats = []
    for layer in self.layers:
      x, s = self._layer(layer, x, positions, segment_ids)
      if s is not None:
        stats.append(s)
    hidden = self.norm(x)
    logits = self.head(hidden)
    mtp_logits = None
    if mtp and len(self.mtp):
      outs, h = [], hidden
      for k, layer in enumerate(self.mtp, start=1):
        # Emb(t_{i+k}); the last k positions have no such token and are masked by the loss.
        shifted = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))
        h, normed, s = layer(self.embed(shifted), h, positions, segment_ids)
        if s is not None:
          stats.append(s)
        outs.append(self.head(normed))
      mtp_logits = jnp.stack(outs)
    return ModelOutput(logits, mtp_logits, hidden, stats)

  def _layer(self, layer, x, positions, segment_ids):
    if self.runtime.remat == "none":
      return layer(x, positions, segment_ids)
    policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
              if self.runtime.remat == "dots" else None)
    return nnx.remat(lambda l, *a: l(*a), policy=policy)(layer, x, positions, segment_ids)

  def __call__(self, tokens, *, positions=None, segment_ids=None) -> jax.Array:
    return self.forward(tokens, positions=positions, segment_ids=segment_ids).logits
