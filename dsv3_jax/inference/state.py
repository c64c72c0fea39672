"""The decode loop's carry and the bookkeeping of emitted tokens (EOS, max tokens, finished)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dsv3_jax.inference.cache import LatentCache

__all__ = ["GenState", "emit", "emit_logp"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GenState:
  """Everything a decode step reads and writes (a pytree; the jitted loop's carry).

  cache: the latent cache; cache.lengths[b] rows are valid, and `last[b]` (the newest emitted
    token, not yet fed to the model) sits at position cache.lengths[b].
  out int32 [B, max_new]: emitted tokens (row b valid up to num[b]); num int32 [B];
  finished bool [B] (EOS emitted or max_new reached); eos int32 [E]: ids that end a sequence
  (-1 pads; never matches); key: PRNG key; steps int32 [].
  Speculative decoding only: draft int32 [B] (the MTP head's guess for the token after `last`),
  draft_probs float32 [B, V] (the distribution it was drawn from; [B, 0] when greedy),
  drafted / accepted int32 [] (drafts checked for unfinished sequences, and how many were kept).
  logp float32 [B, max_new]: log-probability of each emitted token under the distribution it was
  sampled from before truncation, log_softmax(logits / temperature) (temperature 1 when greedy),
  from the logits that chose it (RL needs the sampling policy's log-probs).
  """

  cache: LatentCache
  last: jax.Array
  out: jax.Array
  num: jax.Array
  finished: jax.Array
  eos: jax.Array
  key: jax.Array
  steps: jax.Array
  draft: jax.Array
  draft_probs: jax.Array
  drafted: jax.Array
  accepted: jax.Array
  logp: jax.Array


def _slots(gs: GenState, tokens: jax.Array, count: jax.Array):
  """(valid [B, J], out index [B, J] (max_new where dropped)) of tokens [B, J] (see `emit`)."""
  B, J = tokens.shape
  max_new = gs.out.shape[1]
  is_eos = jnp.any(tokens[..., None] == gs.eos, axis=-1)  # [B, J]
  j = jnp.arange(J)[None, :]
  eos_before = jnp.cumsum(is_eos, axis=1) - is_eos > 0
  valid = (~gs.finished[:, None]) & (j < count[:, None]) & (gs.num[:, None] + j < max_new) & ~eos_before
  return valid, jnp.where(valid, gs.num[:, None] + j, max_new), is_eos


def emit_logp(gs: GenState, tokens: jax.Array, count: jax.Array, logp: jax.Array) -> jax.Array:
  """gs.logp with the log-probs [B, J] of the tokens `emit(gs, tokens, count)` keeps written at
  their output slots (call with the state before `emit`)."""
  _, idx, _ = _slots(gs, tokens, count)
  return gs.logp.at[jnp.arange(tokens.shape[0])[:, None], idx].set(logp, mode="drop")


def emit(gs: GenState, tokens: jax.Array, count: jax.Array):
  """Appends up to `count[b]` of tokens [B, J] to each unfinished sequence, stopping after an EOS
  or at the output buffer's end. Returns (out, num, finished, kept [B] int32)."""
  B, J = tokens.shape
  max_new = gs.out.shape[1]
  valid, idx, is_eos = _slots(gs, tokens, count)  # out of range -> dropped
  out = gs.out.at[jnp.arange(B)[:, None], idx].set(tokens, mode="drop")
  kept = valid.sum(1).astype(jnp.int32)
  num = gs.num + kept
  finished = gs.finished | jnp.any(valid & is_eos, axis=1) | (num >= max_new)
  return out, num, finished, kept
