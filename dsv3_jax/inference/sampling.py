"""Token sampling: greedy, temperature, top-k, top-p (nucleus).

Order (as transformers' generate): logits / temperature, keep the top-k, then keep the smallest
set of the most probable remaining tokens whose probability reaches top_p (the renormalised
top-k distribution), sample from the renormalised survivors. temperature == 0 is greedy.
Ties are broken by token id (lower id first), deterministically.

Einsum letters: B batch, V vocabulary, K kept candidates.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["SamplingParams", "candidates", "probabilities", "sample", "sample_from_probs",
           "token_logprob"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 -> greedy; top_k 0 -> off; top_p 1.0 -> off. Hashable (a jit static arg)."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0.0


def candidates(logits: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
  """The sampling support: logits [B, V] -> (scaled logits [B, K] sorted descending with -inf for
  tokens cut by top-k/top-p, token ids [B, K]). K = top_k when set, else V."""
  if params.greedy:
    raise ValueError("candidates() is for temperature > 0; greedy uses argmax")
  V = logits.shape[-1]
  scaled = logits.astype(jnp.float32) / params.temperature
  k = params.top_k if 0 < params.top_k < V else V
  if k < V or params.top_p < 1.0:
    vals, ids = jax.lax.top_k(scaled, k)  # sorted descending, ties by lower id
  else:
    return scaled, jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), scaled.shape)
  if params.top_p < 1.0:
    p = jax.nn.softmax(vals, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p  # mass of strictly more probable candidates
    keep = before < params.top_p
    keep = keep.at[:, 0].set(True)
    vals = jnp.where(keep, vals, -jnp.inf)
  return vals, ids.astype(jnp.int32)


def probabilities(logits: jax.Array, params: SamplingParams) -> jax.Array:
  """The distribution `sample` draws from, as float32 [B, V] (one-hot argmax when greedy)."""
  if params.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
  vals, ids = candidates(logits, params)
  p = jax.nn.softmax(vals, axis=-1)
  rows = jnp.arange(logits.shape[0])[:, None]
  return jnp.zeros(logits.shape, jnp.float32).at[rows, ids].set(p)


def sample(key: jax.Array, logits: jax.Array, params: SamplingParams) -> jax.Array:
  """logits [B, V] -> token ids int32 [B]."""
  if params.greedy:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  vals, ids = candidates(logits, params)
  j = jax.random.categorical(key, vals, axis=-1)
  return jnp.take_along_axis(ids, j[:, None], axis=-1)[:, 0]


def sample_from_probs(key: jax.Array, probs: jax.Array) -> jax.Array:
  """probs [B, V] (rows summing to 1, zeros allowed) -> token ids int32 [B]."""
  logp = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, 1e-38)), -jnp.inf)
  return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)


def token_logprob(logits: jax.Array, tokens: jax.Array, params: SamplingParams) -> jax.Array:
  """log softmax(logits / temperature)[token] (temperature 1 when greedy; top-k/top-p truncation
  not applied): logits [..., V], tokens int [...] -> float32 [...]. The log-probability RL's
  importance ratio uses; the training forward computes the same from its logits."""
  t = params.temperature if params.temperature > 0 else 1.0
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / t, axis=-1)
  return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
