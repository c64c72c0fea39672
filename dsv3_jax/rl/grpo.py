"""GRPO (DeepSeekMath / DeepSeek-R1): group-relative advantages, the clipped importance-ratio
objective per token, and a KL penalty to a frozen reference with the unbiased k3 estimator.

Einsum letters: N rollouts (= prompts x G completions, rows of a group adjacent), T tokens.

For completion o_i of group g (G completions of one prompt), reward r_i:
  A_i = (r_i - mean_g r) / (std_g r + eps)       (population std over the group)
For each completion token t (mask 1), with log-probs logp (policy being trained), old (the
policy that sampled: the inference engine's log-probs) and ref (the frozen reference):
  ratio = exp(logp - old)
  pg    = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
  kl    = exp(ref - logp) - (ref - logp) - 1    (k3: unbiased for KL(pi || ref), >= 0)
  loss_t = pg + beta * kl
The loss is the mean over rollouts of each rollout's mean over its completion tokens (the GRPO
paper's 1/G sum_i 1/|o_i| sum_t), rollouts without tokens excluded. Padding (mask 0) contributes
nothing, whatever the log-probs there. All-equal rewards in a group give A = 0: no policy
gradient from that group (the KL term still pulls towards the reference).
Log-probs are those of softmax(logits / temperature), the distribution the engine sampled from.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

__all__ = ["GRPOConfig", "group_advantages", "grpo_loss", "token_logprobs"]


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """group_size G; clip_low/clip_high: the ratio clip range [1 - low, 1 + high]; beta: KL weight;
  eps: advantage denominator guard; temperature: the rollouts' (log-probs use it too);
  inner_steps: optimizer steps per rollout batch (mu)."""

  group_size: int = 8
  clip_low: float = 0.2
  clip_high: float = 0.2
  beta: float = 0.04
  eps: float = 1e-4
  temperature: float = 1.0
  inner_steps: int = 2

  def __post_init__(self):
    if self.group_size < 2:
      raise ValueError(f"group_size must be >= 2 (advantages compare a group), got {self.group_size}")
    if self.clip_low < 0 or self.clip_high < 0 or self.beta < 0 or self.eps <= 0:
      raise ValueError(f"need clip_low, clip_high, beta >= 0 and eps > 0, got {self}")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 for GRPO rollouts, got {self.temperature}")
    if self.inner_steps < 1:
      raise ValueError(f"inner_steps must be >= 1, got {self.inner_steps}")


def group_advantages(rewards: jax.Array, group_size: int, eps: float) -> jax.Array:
  """rewards float [N] (N = groups * group_size, a group's rows adjacent) -> advantages [N]."""
  r = rewards.astype(jnp.float32).reshape(-1, group_size)
  a = (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + eps)
  return a.reshape(-1)


def grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array, advantages: jax.Array,
              mask: jax.Array, cfg: GRPOConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The GRPO loss (module docstring). logp / old_logp / ref_logp float32 [N, T], advantages
  [N], mask [N, T] (1 on completion tokens). Returns (loss, metrics: "pg" and "kl" (token means
  over masked tokens), "clip_frac" (fraction of masked tokens whose clipped branch is taken),
  "ratio" (mean ratio))."""
  m = mask.astype(jnp.float32)
  a = advantages.astype(jnp.float32)[:, None]
  ratio = jnp.exp(jnp.where(m > 0, logp - old_logp, 0.0))
  clipped = jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
  pg = -jnp.minimum(ratio * a, clipped * a)
  d = jnp.where(m > 0, ref_logp - logp, 0.0)
  kl = jnp.exp(d) - d - 1.0
  tok = pg + cfg.beta * kl
  n_tok = m.sum(1)
  has = (n_tok > 0).astype(jnp.float32)
  per_seq = (tok * m).sum(1) / jnp.maximum(n_tok, 1.0)
  loss = (per_seq * has).sum() / jnp.maximum(has.sum(), 1.0)
  total = jnp.maximum(m.sum(), 1.0)
  metrics = {"pg": (pg * m).sum() / total, "kl": (kl * m).sum() / total,
             "clip_frac": ((clipped * a < ratio * a).astype(jnp.float32) * m).sum() / total,
             "ratio": (ratio * m).sum() / total}
  return loss, metrics


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Log-prob of each token given its prefix: logits [N, T, V] of `model.forward(tokens)`, tokens
  int [N, T] -> float32 [N, T] with out[:, t] = log softmax(logits[:, t-1] / temperature)[tokens[:, t]]
  for t >= 1 and 0 at t = 0."""
  lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
  picked = jnp.take_along_axis(lp, tokens[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.pad(picked, ((0, 0), (1, 0)))
