"""MTP self-speculative decoding (depth 1) and the plain one-token decode step.

One speculative step, for a sequence whose cache holds positions 0..n-1, with `last` = t_n (not
yet fed) and `draft` = d, the MTP head's guess for t_{n+1}:
  1. verify: the main model runs [t_n, d] at positions n, n+1 in one call (cache rows n, n+1);
     logits at n give p(t_{n+1}), at n+1 give p(t_{n+2} | d).
  2. greedy: accept iff argmax p(t_{n+1}) == d. Sampling: accept with probability
     min(1, p(d)/q(d)); on rejection draw t_{n+1} from norm(max(p - q, 0)) (the standard rule,
     which makes every emitted token distributed exactly as plain sampling). On acceptance the
     bonus t_{n+2} is drawn from p(. | d). So each step emits 1 or 2 tokens. Greedy: every
     emitted token is the argmax of the main model's logits as the verification call computes
     them. In float32 that is the plain step's token; in bfloat16 the two-token call can round
     differently from the one-token step, so at a near-tie (top-2 logits within bf16 rounding)
     the token can differ and the continuation diverges from there
     (tests/test_speculative_bf16.py measures the agreement).
  3. draft again: the MTP block runs positions n and n+1 with inputs [Emb(t_{i+1}); h^0_i] (h^0 =
     the main model's final hidden after model.norm, vLLM's serving choice) and its own latent
     cache; the next draft comes from position n+1 when accepted, else from position n. Rows past
     the kept length are garbage that the lengths mask hides and the next step overwrites.
Only the first MTP depth is used for drafting.

Einsum letters: B batch, V vocabulary, D hidden.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.inference.decode import decode_forward, mtp_decode_forward
from dsv3_jax.inference.sampling import (SamplingParams, probabilities, sample, sample_from_probs,
                                         token_logprob)
from dsv3_jax.inference.state import GenState, emit, emit_logp

__all__ = ["plain_step", "speculative_step", "rejection_sample", "draft_from", "make_mtp_agree"]


def plain_step(model, absorbed, gs: GenState, params: SamplingParams) -> GenState:
  """Feeds `last` at position cache.lengths, samples one token per unfinished sequence."""
  key, k = jax.random.split(gs.key)
  n = gs.cache.lengths
  logits, _, cache = decode_forward(model, absorbed, gs.cache, gs.last[:, None], n[:, None])
  tok = sample(k, logits[:, 0], params)
  logp = emit_logp(gs, tok[:, None], jnp.ones_like(n), token_logprob(logits[:, :1], tok[:, None], params))
  out, num, finished, _ = emit(gs, tok[:, None], jnp.ones_like(n))
  lengths = n + (~gs.finished).astype(jnp.int32)
  last = jnp.where(gs.finished, gs.last, tok)
  return GenState(cache.with_lengths(lengths), last, out, num, finished, gs.eos,
                  key, gs.steps + 1, gs.draft, gs.draft_probs, gs.drafted, gs.accepted, logp)


def draft_from(key, logits: jax.Array, params: SamplingParams):
  """MTP logits [B, V] -> (draft [B] int32, its distribution [B, V] float32, or [B, 0] if greedy)."""
  if params.greedy:
    return sample(key, logits, params), jnp.zeros((logits.shape[0], 0), jnp.float32)
  q = probabilities(logits, params)
  return sample_from_probs(key, q), q


def rejection_sample(key_accept, key_resample, p: jax.Array, q: jax.Array, draft: jax.Array):
  """The speculative-sampling rule for one draft token per sequence.

  p [B, V]: the target distribution; q [B, V]: the draft distribution; draft int32 [B] drawn from
  q. Accept with probability min(1, p(d)/q(d)), else draw from norm(max(p - q, 0)) (p itself if
  p == q). Returns (token [B] int32, distributed exactly as p; accepted bool [B]).
  """
  rows = jnp.arange(p.shape[0])
  pd, qd = p[rows, draft], q[rows, draft]
  accept = jax.random.uniform(key_accept, pd.shape) * qd < pd  # u < p(d)/q(d); q(d) > 0
  resid = jnp.maximum(p - q, 0.0)
  total = resid.sum(-1, keepdims=True)
  resid = jnp.where(total > 0, resid / jnp.where(total > 0, total, 1.0), p)
  return jnp.where(accept, draft, sample_from_probs(key_resample, resid)), accept


def speculative_step(model, absorbed, gs: GenState, params: SamplingParams) -> GenState:
  """Verify the draft with the main model, keep 1 or 2 tokens, draft the next one (see module)."""
  key, k_acc, k_res, k_bonus, k_draft = jax.random.split(gs.key, 5)
  n = gs.cache.lengths
  positions = n[:, None] + jnp.arange(2, dtype=jnp.int32)[None, :]
  fed = jnp.stack([gs.last, gs.draft], axis=1)
  logits, hidden, cache = decode_forward(model, absorbed, gs.cache, fed, positions)
  if params.greedy:
    first = jnp.argmax(logits[:, 0], -1).astype(jnp.int32)
    accept = first == gs.draft
    bonus = jnp.argmax(logits[:, 1], -1).astype(jnp.int32)
  else:
    first, accept = rejection_sample(k_acc, k_res, probabilities(logits[:, 0], params),
                                     gs.draft_probs, gs.draft)
    bonus = sample(k_bonus, logits[:, 1], params)
  new = jnp.stack([first, bonus], axis=1)
  count = 1 + accept.astype(jnp.int32)
  logp = emit_logp(gs, new, count, token_logprob(logits[:, :2], new, params))
  out, num, finished, _ = emit(gs, new, count)
  active = ~gs.finished
  lengths = n + jnp.where(active, count, 0)
  mtp_logits, cache = mtp_decode_forward(model, absorbed, cache, new, hidden, positions)
  draft, draft_probs = draft_from(k_draft, jnp.where(accept[:, None], mtp_logits[:, 1],
                                                     mtp_logits[:, 0]), params)
  last = jnp.where(active, jnp.where(accept, bonus, first), gs.last)
  return GenState(cache.with_lengths(lengths), last, out, num, finished, gs.eos,
                  key, gs.steps + 1, draft, draft_probs,
                  gs.drafted + active.sum().astype(jnp.int32),
                  gs.accepted + (active & accept).sum().astype(jnp.int32), logp)


def make_mtp_agree(model, main_scale: float = 0.0) -> None:
  """Forces the MTP head to agree with the main model (in place; for tests and benchmarks).

  Every main-layer and MTP-block residual branch (o_proj, dense/shared/routed down projections)
  is multiplied by `main_scale`, so the main model's next-token logits are head(norm(Emb(t) +
  main_scale * context)). The MTP block is made to pass Emb(t_{i+1}) through: eh_proj = [I; 0]
  (embedding half first), enorm weight 1, shared_head_norm weight = model.norm weight. With
  main_scale = 0 both heads compute head(norm(Emb(t_{i+1}))) (up to the RMSNorm epsilon), so the
  draft matches greedy verification essentially always; main_scale > 0 lets context perturb
  the main model, lowering acceptance. All matmuls keep their shapes, so timings stay realistic.
  """
  from dsv3_jax.pretrained import fp8_variables
  if fp8_variables(model):
    raise ValueError("make_mtp_agree edits dense weights; this model keeps FP8 weights "
                     "(load it with fp8='dequantize')")

  def scale(var, s):
    var.set_value((var.get_value() * s).astype(var.get_value().dtype))

  def quiet(layer, s):
    scale(layer.self_attn.o_proj.kernel, s)
    mlp = layer.mlp
    if layer.is_moe:
      scale(mlp.experts.down_proj, s)
      if mlp.shared_experts is not None:
        scale(mlp.shared_experts.down_proj.kernel, s)
    else:
      scale(mlp.down_proj.kernel, s)

  for stack in model.stacks:  # scales every layer of the stack at once
    quiet(stack.block, main_scale)
  D = model.config.hidden_size
  for m in model.mtp:
    quiet(m.block, 0.0)
    k = m.eh_proj.kernel
    k.set_value(jnp.concatenate([jnp.eye(D), jnp.zeros((D, D))], 0).astype(k.get_value().dtype))
    m.enorm.weight.set_value(jnp.ones_like(m.enorm.weight.get_value()))
    m.shared_head_norm.weight.set_value(model.norm.weight.get_value())
