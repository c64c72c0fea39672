"""Optimizer: AdamW (betas 0.9/0.95, decay on matrices only), learning-rate schedules, clipping.

Mixed precision: parameters (the master copy) and the Adam moments are kept in
`RuntimeConfig.param_dtype` (float32), matmuls run in `RuntimeConfig.dtype` (bfloat16); see
`training_runtime`. Only `nnx.Param` leaves are optimised: the router's selection bias is a
`RouterBias` and is moved by `dsv3_jax.train.balance` instead.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from dsv3_jax.config import RuntimeConfig

__all__ = ["OptimConfig", "make_schedule", "make_optimizer", "decay_mask", "training_runtime"]

SCHEDULES = ("cosine", "constant_decay", "constant")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """lr: peak learning rate; warmup_steps: linear warm-up from 0; total_steps: schedule length.

  schedule: "cosine" (warm-up then cosine to lr*final_lr_ratio at total_steps), "constant_decay"
  (the DeepSeek-V3 shape: warm-up, constant until decay_start*total_steps, cosine down to
  lr*final_lr_ratio at total_steps) or "constant" (warm-up then constant).
  """

  lr: float = 3e-4
  warmup_steps: int = 100
  total_steps: int = 1000
  schedule: str = "cosine"
  decay_start: float = 0.8
  final_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float | None = 1.0
  mu_dtype: str | None = None  # first Adam moment dtype (None: the parameters' dtype)

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
    if self.lr <= 0 or self.total_steps < 1 or self.warmup_steps < 0:
      raise ValueError(f"need lr > 0, total_steps >= 1, warmup_steps >= 0; got {self}")
    if not 0.0 <= self.decay_start <= 1.0:
      raise ValueError(f"decay_start must be a fraction in [0, 1], got {self.decay_start}")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
  """step -> learning rate (see OptimConfig)."""
  warm = max(cfg.warmup_steps, 0)
  final = cfg.lr * cfg.final_lr_ratio
  warmup = optax.linear_schedule(0.0, cfg.lr, warm) if warm else optax.constant_schedule(cfg.lr)
  if cfg.schedule == "constant":
    return optax.join_schedules([warmup, optax.constant_schedule(cfg.lr)], [warm])
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps - warm, 1), alpha=cfg.final_lr_ratio)
    return optax.join_schedules([warmup, decay], [warm])
  start = max(int(cfg.decay_start * cfg.total_steps), warm)
  decay = optax.cosine_decay_schedule(cfg.lr, max(cfg.total_steps - start, 1), alpha=cfg.final_lr_ratio)
  tail = optax.constant_schedule(final)
  return optax.join_schedules([warmup, optax.constant_schedule(cfg.lr), decay, tail],
                              [warm, start, max(cfg.total_steps, start + 1)])


def decay_mask(params) -> object:
  """True for leaves with ndim >= 2 (matrices, embeddings, stacked experts): they get weight
  decay; norms' scales and other vectors do not."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with the schedule and the matrices-only decay mask."""
  adamw = optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask, mu_dtype=cfg.mu_dtype)
  if cfg.clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)


def training_runtime(compute_dtype=jnp.bfloat16, remat: str = "none", **kw) -> RuntimeConfig:
  """RuntimeConfig for training: float32 master weights, `compute_dtype` matmuls, the given
  rematerialisation policy ("none", "full", "dots")."""
  return RuntimeConfig(param_dtype=jnp.float32, dtype=compute_dtype, remat=remat, **kw)

