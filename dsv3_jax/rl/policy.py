"""The post-training state shared by SFT and GRPO: policy parameters + AdamW state on a mesh, a
jitted step for any objective, a jitted log-prob forward, Orbax checkpoints.

The step is `dsv3_jax.train.trainer`'s recipe with the loss swapped: a pure function of (state,
batch) with the state donated, value_and_grad over the nnx.Param leaves, the project's optimizer
(`dsv3_jax.train.optim.make_optimizer`: clipping + AdamW + schedule), run under
`jax.set_mesh(mesh)` with the state in the shardings `ShardingRules` give its logical axes and
every batch array split on its first ("batch") dim. The router bias is frozen (post-training
moves only the Params). An objective is a hashable callable (model, batch dict) -> (loss,
metrics) (a frozen dataclass: `GRPOObjective`, `dsv3_jax.rl.sft.SFTObjective`), a static argument
of the jitted step.

Checkpoints are the Trainer's layout (`dsv3_jax.train.checkpointing`): params/ is the per-layer
parameter tree, so `dsv3 generate`, `--init` and `from_pretrained` read a post-training run like a
`dsv3 train` run; meta/ carries the step and the caller's extra JSON.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from dsv3_jax.jit_cache import CompiledCache, sharding_key
from dsv3_jax.param_tree import flatten, nest
from dsv3_jax.pretrained import flat_variables, model_from_arrays
from dsv3_jax.rl.grpo import GRPOConfig, grpo_loss, token_logprobs
from dsv3_jax.sharding import (ShardingRules, activation_sharding, compile_options_for,
                               global_batch, resolve_mesh, rules_for_mesh, tree_shardings,
                               use_rules)
from dsv3_jax.sharding.entry import replicated
from dsv3_jax.train.checkpointing import RunCheckpointer, abstract_params
from dsv3_jax.train.optim import OptimConfig, make_optimizer, make_schedule

__all__ = ["PolicyTrainer", "GRPOObjective", "batch_shardings"]


@dataclasses.dataclass(frozen=True)
class GRPOObjective:
  """GRPO on a rollout batch {"tokens" int [N, T], "mask" [N, T], "old_logp", "ref_logp" float32
  [N, T], "adv" float32 [N]} (see `dsv3_jax.rl.grpo`)."""

  cfg: GRPOConfig

  def __call__(self, model, batch):
    out = model.forward(batch["tokens"])
    logp = token_logprobs(out.logits, batch["tokens"], self.cfg.temperature)
    return grpo_loss(logp, batch["old_logp"], batch["ref_logp"], batch["adv"], batch["mask"],
                     self.cfg)


def batch_shardings(batch: Mapping[str, Any], rules: ShardingRules, mesh: Mesh) -> dict:
  """Every array [N, ...] split on N per the "batch" rule (replicated when N does not divide)."""
  return {k: activation_sharding(("batch",) + (None,) * (np.ndim(v) - 1), rules, mesh,
                                 tuple(np.shape(v))) for k, v in batch.items()}


def _step(graphdef, state, batch, *, objective, optim_cfg: OptimConfig):
  tx = make_optimizer(optim_cfg)
  params, rest = state["params"], state["rest"]

  def loss_fn(p):
    return objective(nnx.merge(graphdef, p, rest, copy=True), batch)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                 lr=make_schedule(optim_cfg)(state["step"]))
  updates, opt = tx.update(grads, state["opt"], params)
  return {"params": optax.apply_updates(params, updates), "rest": rest, "opt": opt,
          "step": state["step"] + 1}, metrics


def _logprobs(graphdef, params, rest, tokens, *, temperature: float):
  return token_logprobs(nnx.merge(graphdef, params, rest).forward(tokens).logits, tokens,
                        temperature)


COMPILED = CompiledCache(16)


class PolicyTrainer:
  """Owns the policy (params, router bias, optimizer state, step) on a mesh.

  model: the starting DeepseekV3 (e.g. `from_pretrained(CKPT, mesh=mesh)`); optim: the schedule;
  mesh / rules: as `dsv3_jax.train.Trainer`; out_dir: checkpoints go to out_dir/checkpoints
  (None: none); compiler_options: XLA options of the compiled functions (on a TPU mesh over
  `sharding.compile_options_for(mesh, train=True)`).
  `step(objective, batch)` runs one optimizer step; `logprobs(tokens)` the policy's (or with
  `params=`, another parameter tree's, e.g. a frozen reference's) token log-probs.
  """

  def __init__(self, model, optim: OptimConfig, *, mesh=None, rules: ShardingRules | None = None,
               out_dir: str | None = None, save_every: int = 10, keep: int = 2,
               compiler_options: dict | None = None):
    self.cfg, self.runtime, self.optim = model.config, model.runtime, optim
    # the Trainer's default rules too (`rules_for_mesh`: pod rules on a mesh without `tensor`)
    self.mesh = resolve_mesh(mesh)
    self.rules = rules or rules_for_mesh(self.mesh)
    # on a TPU mesh over the package's own options for training programs, as the Trainer's
    self.copts = tuple(sorted(compile_options_for(self.mesh, compiler_options,
                                                  train=True).items()))
    self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(optim)
    opt = jax.eval_shape(tx.init, params)
    self.shardings = {"params": tree_shardings(params, self.rules, self.mesh),
                      "rest": tree_shardings(rest, self.rules, self.mesh),
                      "opt": tree_shardings(opt, self.rules, self.mesh),
                      "step": replicated(self.mesh)}
    sh = self.shardings
    params, rest = jax.device_put((params, rest), (sh["params"], sh["rest"]))
    init = jax.jit(lambda p: make_optimizer(optim).init(p), out_shardings=sh["opt"],
                   compiler_options=dict(self.copts) or None)
    self.state = {"params": params, "rest": rest, "opt": init(params),
                  "step": jax.device_put(jnp.zeros((), jnp.int32), sh["step"])}
    self.step_count = 0
    self.checkpointer = (RunCheckpointer(f"{out_dir}/checkpoints", save_every=save_every,
                                         keep=keep) if out_dir else None)

  @property
  def model(self):
    return nnx.merge(self.graphdef, self.state["params"], self.state["rest"])

  def _compiled(self, kind, fn, statics, in_sh, out_sh, donate=()):
    key = (kind, self.graphdef, tuple(sorted(statics.items(), key=lambda kv: kv[0])), self.mesh,
           self.rules, sharding_key(in_sh), sharding_key(out_sh), self.copts)
    return COMPILED.get_or_make(key, lambda: jax.jit(
        functools.partial(fn, self.graphdef, **statics), in_shardings=in_sh,
        out_shardings=out_sh, donate_argnums=donate,
        compiler_options=dict(self.copts) or None))

  def _global(self, batch: Mapping[str, np.ndarray]):
    sh = batch_shardings(batch, self.rules, self.mesh)
    return {k: global_batch(np.asarray(v), sh[k], np.shape(v)) for k, v in batch.items()}, sh

  def step(self, objective, batch: Mapping[str, np.ndarray]) -> dict[str, float]:
    """One optimizer step of `objective` on `batch` (host arrays, the global batch); returns the
    objective's metrics plus loss, grad_norm, lr as floats."""
    arrays, sh = self._global(batch)
    fn = self._compiled("step", _step, dict(objective=objective, optim_cfg=self.optim),
                        (self.shardings, sh), (self.shardings, replicated(self.mesh)),
                        donate=(0,))
    with jax.set_mesh(self.mesh), use_rules(self.rules):
      self.state, m = fn(self.state, arrays)
    self.step_count += 1
    return {k: float(v) for k, v in jax.device_get(m).items()}

  def logprobs(self, tokens: np.ndarray, temperature: float = 1.0, params=None, rest=None
               ) -> np.ndarray:
    """Token log-probs [N, T] (`dsv3_jax.rl.grpo.token_logprobs`) of tokens int [N, T] under the
    policy, or under `params`/`rest` (trees of the policy's structure, e.g. a frozen reference)."""
    arrays, sh = self._global({"tokens": np.asarray(tokens, np.int32)})
    fn = self._compiled("logprobs", _logprobs, dict(temperature=float(temperature)),
                        (self.shardings["params"], self.shardings["rest"], sh["tokens"]),
                        sh["tokens"])
    with jax.set_mesh(self.mesh), use_rules(self.rules):
      out = fn(self.state["params"] if params is None else params,
               self.state["rest"] if rest is None else rest, arrays["tokens"])
    return np.asarray(jax.device_get(out))

  def frozen_copy(self):
    """(params, rest): a copy of the current weights (the step donates the policy's buffers)."""
    return jax.tree.map(jnp.copy, (self.state["params"], self.state["rest"]))

  # Checkpoints -------------------------------------------------------------------------------
  def save(self, meta: dict, force: bool = False) -> bool:
    """Saves params/opt/step and `meta` (JSON) at the current step if due (or `force`)."""
    if self.checkpointer is None:
      raise ValueError("this PolicyTrainer has no out_dir: nothing to save to")
    flat = {k: v.get_value() for k, v in flat_variables(self.model).items()}
    items = {"params": nest(flat), "opt": self.state["opt"], "state": {"step": self.state["step"]}}
    return self.checkpointer.save(self.step_count, items, dict(meta, step=self.step_count),
                                  force=force)

  def restore(self) -> dict | None:
    """Loads the latest checkpoint; returns its meta (None when there is none)."""
    if self.checkpointer is None or self.checkpointer.latest_step() is None:
      return None
    items = {"params": abstract_params(self.cfg, self.runtime, self.mesh, self.rules),
             "opt": self.state["opt"],
             "state": {"step": self.state["step"]}}
    out, meta, _ = self.checkpointer.restore(items)
    model = model_from_arrays(self.cfg, self.runtime, flatten(out["params"]))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    sh = self.shardings
    params, rest = jax.device_put((params, rest), (sh["params"], sh["rest"]))
    self.state = {"params": params, "rest": rest, "opt": out["opt"], **out["state"]}
    self.step_count = int(meta["step"])
    return meta

  def close(self) -> None:
    if self.checkpointer is not None:
      self.checkpointer.close()
