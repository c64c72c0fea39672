"""The training loop: a jitted step (forward with MTP, loss, AdamW, router-bias update), logging,
checkpoints.

The step is a pure function of (state, batch) built with `nnx.split`/`nnx.merge`: `state` holds
the Params, the other variables (RouterBias), the optax state and the step; it is donated. It
  1. runs model.forward(tokens, positions, segment_ids, mtp=True) in the runtime's compute dtype,
  2. takes the loss of `dsv3_jax.train.loss` and its gradient w.r.t. the nnx.Param leaves only,
  3. applies the optimizer (clip + AdamW) to the Params,
  4. moves every RouterBias by gamma * sign(mean load - load) from this step's loads.
Metrics per step: loss, ce, mtp_ce, balance, load_ratio (max/mean expert load, mean over MoE
layers), ep_overflow (rows sent in extra expert-parallel exchange rounds), grad_norm, lr, plus
host-side tokens/s and MFU.

Every run is on a device mesh (one device: a mesh of one): the state lives in the shardings the
`ShardingRules` give each variable's logical axes, the step is jitted with those in/out shardings
and runs under `jax.set_mesh(mesh)`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from dsv3_jax.config import ModelConfig, RuntimeConfig
from dsv3_jax.errors import UserError
from dsv3_jax.jit_cache import CompiledCache, sharding_key
from dsv3_jax.model import DeepseekV3
from dsv3_jax.param_tree import flatten, nest
from dsv3_jax.pretrained import count_params, flat_variables, model_from_arrays
from dsv3_jax.sharding import (ShardingRules, compile_options_for, activation_sharding, rules_for_mesh, check_fits, global_batch, use_rules,
                               resolve_mesh, sharded_nbytes, tree_shardings)
from dsv3_jax.sharding.entry import replicated
from dsv3_jax.train.balance import load_ratio, update_router_bias
from dsv3_jax.train.checkpointing import RunCheckpointer, abstract_params
from dsv3_jax.train.data import Batch, DataState, TokenDataset
from dsv3_jax.train.loss import LossConfig, training_loss
from dsv3_jax.train.optim import OptimConfig, make_optimizer, make_schedule

__all__ = ["TrainConfig", "Trainer", "train_flops_per_token", "train_step_fn", "H100_PEAK_FLOPS",
           "ResumeError", "write_run_config"]


class ResumeError(ValueError, UserError):
  """A checkpoint that this run cannot continue from (other batch/sequence shape)."""

H100_PEAK_FLOPS = 790e12  # dense bf16, as measured on the lent H100 (ARCHITECTURE.md)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """What a run does (the model is a ModelConfig, the dtypes/remat a RuntimeConfig).

  mtp_lambda_later / mtp_lambda_switch: the paper's schedule, lambda = loss.mtp_lambda before step
  `mtp_lambda_switch` and `mtp_lambda_later` from then on (None: constant).
  bias_gamma: aux-loss-free bias step (0 freezes the bias).
  document_mask: pass segment ids (and restarting positions) to the model so attention stays in a
  document; off by default as in the paper (the loss never crosses documents either way).
  save_every / keep: checkpoint cadence and retention when the trainer has an output directory.
  peak_flops: accelerator peak for MFU (None: MFU not reported).
  """

  steps: int = 1000
  seed: int = 0
  optim: OptimConfig = OptimConfig()
  loss: LossConfig = LossConfig()
  mtp_lambda_later: float | None = None
  mtp_lambda_switch: int | None = None
  bias_gamma: float = 1e-3
  document_mask: bool = False
  save_every: int = 1000
  keep: int = 3
  peak_flops: float | None = None

  def __post_init__(self):
    if self.bias_gamma < 0:
      raise ValueError(f"bias_gamma must be >= 0 (0 freezes the bias), got {self.bias_gamma}")

  def mtp_lambda(self, step: int) -> float:
    if self.mtp_lambda_later is not None and self.mtp_lambda_switch is not None \
        and step >= self.mtp_lambda_switch:
      return self.mtp_lambda_later
    return self.loss.mtp_lambda


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 * (activated matmul params) + causal attention scores/values.

  Activated params: `count_params(cfg).activated` (+ the MTP modules) without the embedding table
  (a lookup, not a matmul); each MTP depth also runs the shared head (D x V). Attention per layer
  (MTP blocks included): forward 2*T*H*(d_qk + d_v) per token, halved for causality, times 3 for
  forward + backward.
  """
  pc = count_params(cfg)
  D, V = cfg.hidden_size, cfg.vocab_size
  depth = cfg.num_nextn_predict_layers
  matmul_params = pc.activated - V * D + pc.mtp_activated + depth * D * V
  layers = cfg.num_hidden_layers + depth
  attn = 3 * layers * seq_len * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
  return 6.0 * matmul_params + attn


# Jitted steps, shared by Trainers of the same model structure, configs, mesh, rules and
# shardings, so a resumed run in the same process does not compile again (bounded, LRU).
STEPS = CompiledCache(16)


def _compiled_step(graphdef, loss_cfg: LossConfig, document_mask: bool, optim_cfg: OptimConfig,
                   mesh: Mesh, rules: ShardingRules, state_sh, batch_sh: NamedSharding,
                   compiler_options: tuple = ()):
  """The jitted step with its in/out shardings: the state (donated) stays in `state_sh`, the
  batch arrives in `batch_sh`, the metrics come back replicated."""
  key = (graphdef, loss_cfg, document_mask, optim_cfg, mesh, rules, sharding_key(state_sh),
         batch_sh, compiler_options)

  def make():
    repl = replicated(mesh)
    return jax.jit(
        functools.partial(_train_step, graphdef, loss_cfg=loss_cfg, document_mask=document_mask,
                          optim_cfg=optim_cfg),
        in_shardings=(state_sh, batch_sh, batch_sh, batch_sh, repl, repl),
        out_shardings=(state_sh, repl), donate_argnums=(0,),
        compiler_options=dict(compiler_options) or None)
  return STEPS.get_or_make(key, make)


# Jitted initialisers, cached like the step (a resumed run in the same process reuses them).
INITS = CompiledCache(16)


def _model_init(cfg: ModelConfig, runtime: RuntimeConfig, seed: int, mesh: Mesh,
                rules: ShardingRules, shardings, compiler_options: tuple):
  """() -> (Params, rest) of a fresh DeepseekV3(cfg, runtime, Rngs(seed)), each variable made
  directly in its sharding (jit with out_shardings: no device holds the whole model)."""
  def init():
    _, p, r = nnx.split(DeepseekV3(cfg, runtime, rngs=nnx.Rngs(seed)), nnx.Param, ...)
    return p, r
  return INITS.get_or_make(("model", cfg, runtime, seed, mesh, rules, sharding_key(shardings),
                            compiler_options),
                           lambda: jax.jit(init, out_shardings=shardings,
                                           compiler_options=dict(compiler_options) or None))


def _state_init(graphdef, optim_cfg: OptimConfig, mesh: Mesh, rules: ShardingRules,
                state_sh, compiler_options: tuple):
  """(Params, rest) -> the run state: the optimizer state made in its parameters' shardings and
  the step count. The inputs are donated (they become the state's own)."""
  def init(p, r):
    return {"params": p, "rest": r, "opt": make_optimizer(optim_cfg).init(p),
            "step": jnp.zeros((), jnp.int32)}
  return INITS.get_or_make(("state", graphdef, optim_cfg, mesh, rules, sharding_key(state_sh),
                            compiler_options),
                           lambda: jax.jit(init, out_shardings=state_sh, donate_argnums=(0, 1),
                                           compiler_options=dict(compiler_options) or None))


def _train_step(graphdef, state, tokens, segment_ids, positions, mtp_lambda, gamma, *,
                loss_cfg: LossConfig, document_mask: bool, optim_cfg: OptimConfig):
  tx = make_optimizer(optim_cfg)
  params, rest = state["params"], state["rest"]
  seg_in = segment_ids if document_mask else None
  pos_in = positions if document_mask else None

  def loss_fn(p):
    model = nnx.merge(graphdef, p, rest, copy=True)  # no Variable shared with the outer trace
    out = model.forward(tokens, positions=pos_in, segment_ids=seg_in, mtp=True)
    loss, metrics = training_loss(out, tokens, segment_ids, loss_cfg,
                                  model.config.num_experts_per_tok, mtp_lambda)
    return loss, (metrics, out.router_stats)

  # Differentiates the nnx.Param leaves only: the RouterBias lives in `rest`.
  (_, (metrics, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  metrics = dict(metrics, grad_norm=optax.tree.norm(grads), lr=make_schedule(optim_cfg)(state["step"]),
                 load_ratio=load_ratio(stats))
  if stats is not None:
    metrics["layer_load"] = stats["load"]  # [MoE layers, E]
    # (token, expert) rows past the expert-parallel capacity, sent in extra exchange rounds.
    metrics["ep_overflow"] = jnp.sum(stats["ep_overflow"]).astype(jnp.float32)
  updates, opt = tx.update(grads, state["opt"], params)
  params = optax.apply_updates(params, updates)
  model = nnx.merge(graphdef, params, rest, copy=True)
  update_router_bias(model, stats, gamma)
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return {"params": params, "rest": rest, "opt": opt, "step": state["step"] + 1}, metrics


# The pure step (graphdef, state, tokens, segment_ids, positions, mtp_lambda, gamma, *, loss_cfg,
# document_mask, optim_cfg) -> (state, metrics) that `Trainer` jits; `state` has the layout of
# `Trainer.state`. Public for ahead-of-time compilation (`dsv3 plan`).
train_step_fn = _train_step


def write_run_config(out_dir: str, cfg: ModelConfig) -> None:
  """out_dir/config.json (unless there is one): makes the run directory, and each of its steps,
  a checkpoint `from_pretrained` / `dsv3 generate` / `dsv3 export` read. quantization_config is
  dropped (a run's weights are dense)."""
  path = os.path.join(out_dir, "config.json")
  if os.path.isfile(path):
    return
  os.makedirs(out_dir, exist_ok=True)
  raw = cfg.to_hf_config()
  raw.pop("quantization_config", None)
  with open(path + ".tmp", "w") as f:
    json.dump(raw, f, indent=1)
  os.replace(path + ".tmp", path)


class Trainer:
  """Owns the model, optimizer, data reader and (optionally) a checkpointer, on a device mesh.

  cfg / runtime: the model; train: the run; data: a TokenDataset (its batch_size and seq_len are
  the global batch shape); out_dir: checkpoints go to out_dir/checkpoints and the model's
  config.json to out_dir (None: no checkpoints; see `dsv3_jax.train.checkpointing`);
  model: start from this model (e.g. `from_pretrained(..., mesh=mesh)`) instead of a fresh init
  from train.seed.
  mesh: a `jax.sharding.Mesh`, a "fsdp=4,expert=2" string or {name: size} (None: every device on
    `fsdp`, see `dsv3_jax.sharding.default_mesh`; one device is a mesh of one). rules: the
    `ShardingRules` (None: `sharding.rules_for_mesh(mesh)`, what `dsv3 plan` compiles). Parameters, the router bias and the optimizer state
    (each moment sharded like its parameter) are created directly in their shardings (a jitted
    init with out_shardings: no host or device holds the whole model); a given `model` is moved
    there. Batches are split per rules ("batch", "sequence"); the step runs under
    `jax.set_mesh(mesh)` (the MoE's expert parallelism reads that ambient mesh).
  compiler_options: XLA options for the compiled init and step (the tests turn CPU optimisations
    off, where compile time dominates), over the package's own on a TPU mesh
    (`sharding.compile_options_for(mesh, train=True)`); None: those defaults.
  Multi-process: each process's `data` yields the rows of the global batch its devices hold
  (`TokenDataset(shard_index=, num_shards=)` from `dsv3_jax.sharding.process_rows(
  trainer.batch_sharding, (batch, seq))`, as `dsv3 train` does), which become one global batch;
  or every process yields the whole batch (num_shards=1). Checkpoints are written and restored
  per shard by Orbax into the same shardings.
  Raises `dsv3_jax.sharding.MemoryBudgetError` when parameters + optimizer state alone exceed a
  device's memory on this mesh.
  `model` (a DeepseekV3 view of the current state) and `history` (host metrics per step) are
  available at any time.
  """

  def __init__(self, cfg: ModelConfig, runtime: RuntimeConfig, train: TrainConfig,
               data: TokenDataset, out_dir: str | None = None, model: DeepseekV3 | None = None,
               *, mesh: Mesh | Mapping[str, int] | str | None = None,
               rules: ShardingRules | None = None, compiler_options: dict | None = None):
    if data.vocab_size is not None and data.vocab_size > cfg.vocab_size:
      raise ValueError(f"data vocab_size {data.vocab_size} exceeds model vocab_size {cfg.vocab_size}")
    if model is not None and model.config != cfg:
      raise ValueError("the given model's config differs from `cfg`")
    self.cfg, self.runtime, self.train, self.data = cfg, runtime, train, data
    self.mesh = resolve_mesh(mesh)
    self.rules = rules or rules_for_mesh(self.mesh)
    tx = make_optimizer(train.optim)  # for the shapes of its state (each run jits its own)
    self.schedule = make_schedule(train.optim)
    fresh = model is None
    if fresh:
      model = nnx.eval_shape(lambda: DeepseekV3(cfg, runtime, rngs=nnx.Rngs(train.seed)))
    self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = jax.eval_shape(tx.init, params)
    repl = replicated(self.mesh)
    sh = {"params": tree_shardings(params, self.rules, self.mesh),
          "rest": tree_shardings(rest, self.rules, self.mesh),
          "opt": tree_shardings(opt, self.rules, self.mesh), "step": repl}
    self.state_shardings = sh
    need = sum(sharded_nbytes(a, sh[k]) for k, a in (("params", params), ("rest", rest), ("opt", opt)))
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    check_fits(need, self.mesh, f"training this model ({n_params / 1e9:.3g}B parameters): "
               "parameters + optimizer state",
               hint="use more devices / a bigger mesh (--mesh), or check a TPU topology with "
                    "`dsv3 plan`")
    # state: Params (fp32 master copy), the other variables (RouterBias), the optax state and
    # the step count (no RNG: the step is deterministic; the model uses no randomness).
    copts = tuple(sorted(compile_options_for(self.mesh, compiler_options, train=True).items()))
    if fresh:
      params, rest = _model_init(cfg, runtime, train.seed, self.mesh, self.rules,
                                 (sh["params"], sh["rest"]), copts)()
    else:
      params, rest = jax.device_put((params, rest), (sh["params"], sh["rest"]))
    self.state = _state_init(self.graphdef, train.optim, self.mesh, self.rules, sh,
                             copts)(params, rest)
    self.step = 0
    self.history: list[dict[str, Any]] = []
    self.checkpointer = (RunCheckpointer(f"{out_dir}/checkpoints", save_every=train.save_every,
                                         keep=train.keep) if out_dir else None)
    if out_dir and jax.process_index() == 0:
      write_run_config(out_dir, cfg)
    self.batch_shape = (data.batch_size, data.seq_len)
    self.batch_sharding = activation_sharding(("batch", "sequence"), self.rules, self.mesh,
                                              self.batch_shape)
    self._step_fn = _compiled_step(self.graphdef, train.loss, train.document_mask, train.optim,
                                   self.mesh, self.rules, sh, self.batch_sharding, copts)
    self.flops_per_token = train_flops_per_token(cfg, data.seq_len)

  @property
  def model(self) -> DeepseekV3:
    return nnx.merge(self.graphdef, self.state["params"], self.state["rest"])

  # Checkpoints -------------------------------------------------------------------------------
  def checkpoint_items(self) -> dict[str, Any]:
    """{"params": the parameter tree (`dsv3_jax.param_tree`, per layer), "opt": the optax
    state, "state": {"step"}}: what a checkpoint stores, as pure-array pytrees."""
    flat = {k: v.get_value() for k, v in flat_variables(self.model).items()}
    return {"params": nest(flat), "opt": jax.tree.map(lambda x: x, self.state["opt"]),
            "state": {"step": self.state["step"]}}

  def save(self, force: bool = False) -> bool:
    """Saves the run at the current step if due (or `force`). Needs an out_dir."""
    if self.checkpointer is None:
      raise ValueError("this Trainer has no out_dir: nothing to save to")
    meta = {"step": self.step, "data": self.data.state.to_dict(), "data_seed": self.data.seed,
            "seq_len": self.data.seq_len, "batch_size": self.data.batch_size}
    return self.checkpointer.save(self.step, self.checkpoint_items(), meta, force=force)

  def restore(self, step: int | None = None) -> bool:
    """Loads the latest (or the given) checkpoint; False when there is none."""
    if self.checkpointer is None or (step is None and self.checkpointer.latest_step() is None):
      return False
    items = {"params": abstract_params(self.cfg, self.runtime, self.mesh, self.rules),
             "opt": self.state["opt"],
             "state": {"step": self.state["step"]}}
    out, meta, step = self.checkpointer.restore(items, step)
    if meta["data_seed"] != self.data.seed:
      raise UserError(f"{self.checkpointer.directory}: checkpoint was written with data seed "
                      f"{meta['data_seed']}, this run reads its data with seed {self.data.seed}")
    if (meta["seq_len"], meta["batch_size"]) != (self.data.seq_len, self.data.batch_size):
      raise ResumeError(f"{self.checkpointer.directory}: checkpoint was written with seq_len="
                        f"{meta['seq_len']} batch={meta['batch_size']}, this run uses seq_len="
                        f"{self.data.seq_len} batch={self.data.batch_size}")
    model = model_from_arrays(self.cfg, self.runtime, flatten(out["params"]))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    sh = self.state_shardings
    params, rest = jax.device_put((params, rest), (sh["params"], sh["rest"]))
    self.state = {"params": params, "rest": rest, "opt": out["opt"], **out["state"]}
    self.step = int(meta["step"])
    self.data.state = DataState.from_dict(meta["data"])
    return True

  # Training ----------------------------------------------------------------------------------
  def train_step(self, batch: Batch) -> dict[str, Any]:
    """One optimizer step on `batch` (int32 [B, T] host arrays: the global batch, or this
    process's rows of it); returns host metrics (floats, layer_load as numpy)."""
    t0 = time.perf_counter()
    tokens, seg, pos = (global_batch(x, self.batch_sharding, self.batch_shape)
                        for x in (batch.tokens, batch.segment_ids, batch.positions))
    lam = np.float32(self.train.mtp_lambda(self.step))
    with jax.set_mesh(self.mesh), use_rules(self.rules):
      self.state, m = self._step_fn(self.state, tokens, seg, pos, lam,
                                    np.float32(self.train.bias_gamma))
    m = jax.device_get(m)
    dt = time.perf_counter() - t0
    self.step += 1
    out = {k: (np.asarray(v) if k == "layer_load" else float(v)) for k, v in m.items()}
    ntok = math.prod(self.batch_shape)
    out.update(step=self.step, step_time=dt, tokens_per_s=ntok / dt)
    if self.train.peak_flops:
      out["mfu"] = self.flops_per_token * ntok / dt / (self.train.peak_flops * jax.device_count())
    self.history.append(out)
    return out

  def run(self, steps: int | None = None, *, callback: Callable[[dict], None] | None = None,
          ) -> Iterator[dict[str, Any]]:
    """Trains until `steps` total steps (default train.steps), yielding each step's metrics;
    saves on the checkpoint cadence and at the end. A step's checkpoint is written after its
    metrics are handed out (yield / callback), so a log written from them holds every step a
    checkpoint holds, even when the process is killed right after a save."""
    end = self.train.steps if steps is None else steps
    while self.step < end:
      m = self.train_step(self.data.next_batch())
      if callback is not None:
        callback(m)
      yield m
      if self.checkpointer is not None:
        self.save(force=self.step == end)

  def close(self) -> None:
    if self.checkpointer is not None:
      self.checkpointer.close()
