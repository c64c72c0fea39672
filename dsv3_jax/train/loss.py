"""Training loss: next-token CE + lambda * mean MTP CE + alpha * sequence-wise balance loss.

Einsum letters: B batch, T sequence, V vocabulary, E routed experts, D MTP depths.

Targets and masks for packed rows. `segment_ids` [B, T] numbers the documents of a row (> 0) and
marks padding with 0. Position i predicts token i+1 (main head) or token i+k+1 (MTP depth k); a
target counts only when it exists (i+k+1 < T) and lies in the same non-padding segment as
position i, so no loss term ever predicts across a document boundary. (Whether attention also
stops at document boundaries is the trainer's `document_mask` switch, off by default as in the
DeepSeek-V3 paper; the loss mask is the same either way.)

Sequence-wise balance loss (DeepSeek-V3 paper, eq. 17-20), per MoE layer and per row b:
  f_i = N_r / (K_r * T) * count_i,   P_i = mean_t s_i,t / sum_j s_j,t,   L_b = sum_i f_i * P_i
(count_i: tokens of the row routed to expert i; f is a constant, the gradient flows through P).
The loss adds alpha * mean_b L_b for every MoE layer (main layers and MTP blocks), i.e. the
per-layer losses are summed, as each layer carries its own balance term in the paper.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["LossConfig", "shifted_targets", "cross_entropy", "balance_loss", "training_loss"]


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """mtp_lambda: weight of the mean MTP cross-entropy (the paper: 0.3 early, 0.1 later; the
  trainer may schedule it). balance_alpha: weight of the sequence-wise balance loss (0 disables).
  """

  mtp_lambda: float = 0.3
  balance_alpha: float = 1e-4

  def __post_init__(self):
    if self.mtp_lambda < 0 or self.balance_alpha < 0:
      raise ValueError(f"mtp_lambda and balance_alpha must be >= 0, got {self}")


def shifted_targets(tokens: jax.Array, segment_ids: jax.Array | None, shift: int
                    ) -> tuple[jax.Array, jax.Array]:
  """Targets token[i+shift] and their validity mask for int tokens [B, T].

  Returns (targets int32 [B, T] (0 where invalid), mask bool [B, T]): valid where i+shift < T and,
  with segment ids, segment[i+shift] == segment[i] > 0.
  """
  B, T = tokens.shape
  pad = ((0, 0), (0, shift))
  targets = jnp.pad(tokens[:, shift:], pad).astype(jnp.int32)
  mask = jnp.broadcast_to(jnp.arange(T) < T - shift, (B, T))
  if segment_ids is not None:
    seg_next = jnp.pad(segment_ids[:, shift:], pad)
    mask = mask & (seg_next == segment_ids) & (segment_ids > 0)
  return jnp.where(mask, targets, 0), mask


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masked token cross-entropy. logits [..., V] (computed in float32), targets/mask [...].

  Returns (sum of -log p(target) over valid positions, number of valid positions), both float32.
  """
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  nll = jnp.where(mask, logz - picked, 0.0)
  return nll.sum(), mask.sum().astype(jnp.float32)


def balance_loss(router_stats: dict[str, Any], num_experts_per_tok: int) -> jax.Array:
  """Sum over MoE layers of mean_b sum_i f_i * P_i (see module docstring); float32 scalar.

  router_stats: the model's stats stacked over MoE layers, with "seq_load" [layers, B, E]
  (tokens per expert per row) and "seq_prob" [layers, B, E] (mean normalised router score per
  row).
  """
  count = jax.lax.stop_gradient(router_stats["seq_load"].astype(jnp.float32))  # [L, B, E]
  E = count.shape[-1]
  T = count.sum(-1, keepdims=True) / num_experts_per_tok  # tokens per row (each picks K)
  f = E / num_experts_per_tok * count / T
  per_layer = jnp.mean(jnp.sum(f * router_stats["seq_prob"].astype(jnp.float32), axis=-1), -1)
  return jnp.sum(per_layer)


def training_loss(out, tokens: jax.Array, segment_ids: jax.Array | None, cfg: LossConfig,
                  num_experts_per_tok: int, mtp_lambda: jax.Array | float | None = None,
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss for a `ModelOutput` from `model.forward(tokens, ..., mtp=True)`.

  tokens int32 [B, T]; segment_ids int [B, T] or None (every position valid, one document per
  row). mtp_lambda overrides cfg.mtp_lambda (a traced value, for schedules).
  Returns (loss, metrics) with metrics "loss", "ce", "mtp_ce" (mean over depths, 0 without MTP),
  "balance" (unweighted), "tokens" (number of next-token targets).
  """
  lam = cfg.mtp_lambda if mtp_lambda is None else mtp_lambda
  targets, mask = shifted_targets(tokens, segment_ids, 1)
  nll, n = cross_entropy(out.logits, targets, mask)
  ce = nll / jnp.maximum(n, 1.0)
  mtp_ce = jnp.zeros((), jnp.float32)
  if out.mtp_logits is not None:
    depth = out.mtp_logits.shape[0]
    for k in range(1, depth + 1):
      # Depth k at position i predicts token i+k+1.
      t_k, m_k = shifted_targets(tokens, segment_ids, k + 1)
      nll_k, n_k = cross_entropy(out.mtp_logits[k - 1], t_k, m_k)
      mtp_ce = mtp_ce + nll_k / jnp.maximum(n_k, 1.0)
    mtp_ce = mtp_ce / depth
  bal = (balance_loss(out.router_stats, num_experts_per_tok)
         if out.router_stats is not None else jnp.zeros((), jnp.float32))
  loss = ce + lam * mtp_ce + cfg.balance_alpha * bal
  return loss, {"loss": loss, "ce": ce, "mtp_ce": mtp_ce, "balance": bal, "tokens": n}
