"""Orbax checkpoints of a training run: periodic saves, keep-N, exact resume.

A run directory (`dsv3 train --out RUN`) holds config.json (the model's), metrics.jsonl and
RUN/checkpoints/<step>/, one Orbax composite per saved step:
  params/  the parameter tree of `dsv3_jax.param_tree` (fp32 master weights and the router bias,
           per layer): the same tree as a `dsv3 convert` output's params/, so `dsv3 generate`,
           `dsv3 export`, `from_pretrained` and plain Orbax read a step like a converted
           checkpoint (`orbax.checkpoint.PyTreeCheckpointer().restore(RUN/checkpoints/<step>/params)`);
  opt/     the optimizer state (step count, Adam moments in the model's stacked layout);
  state/   {"step"}: the step counter;
  meta/    JSON the trainer writes: the step, the data reader's position (`DataState`), its
           seed, seq_len and batch_size (checked on restore).
Restoring all of it continues the run with the same loss sequence as an uninterrupted one.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

__all__ = ["RunCheckpointer", "ITEMS", "abstract_params"]

ITEMS = ("params", "opt", "state")


def abstract_params(cfg, runtime, mesh, rules) -> dict:
  """The params/ item of a run checkpoint as abstract arrays (the per-layer tree of
  `dsv3_jax.param_tree`, each leaf a `jax.ShapeDtypeStruct` with its sharding on `mesh` under
  `rules`): what Orbax restores straight into place."""
  from dsv3_jax.param_tree import nest
  from dsv3_jax.pretrained import abstract_model, flat_variables
  from dsv3_jax.sharding.entry import variable_sharding
  per_layer = variable_sharding(mesh, rules)
  return nest({p: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype,
                                       sharding=per_layer(p, v))
               for p, v in flat_variables(abstract_model(cfg, runtime)).items()})


class RunCheckpointer:
  """Thin wrapper over `orbax.checkpoint.CheckpointManager` for training state.

  directory: where step folders go (created); save_every: save when step % save_every == 0
  (`save(..., force=True)` always saves); keep: how many recent checkpoints to keep.
  """

  def __init__(self, directory: str | os.PathLike, *, save_every: int = 1000, keep: int = 3):
    if save_every < 1 or keep < 1:
      raise ValueError(f"save_every and keep must be >= 1, got {save_every}, {keep}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.save_every = save_every
    opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=True,
                                        enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=opts)

  def save(self, step: int, items: dict[str, Any], meta: dict, *, force: bool = False) -> bool:
    """Saves the pure-array pytrees `items` ({"params", "opt", "state"}) and JSON `meta` at
    `step` if due (or `force`). A step that already has a checkpoint is not rewritten. Returns
    whether one was written."""
    if (not force and step % self.save_every) or step in self.manager.all_steps():
      return False
    args = {k: ocp.args.StandardSave(items[k]) for k in ITEMS}
    saved = self.manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args),
                              force=force)
    self.manager.wait_until_finished()
    return bool(saved)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def restore(self, abstract: dict[str, Any], step: int | None = None) -> tuple[dict, dict, int]:
    """Restores ({"params", "opt", "state"}, meta, step) at `step` (default: the latest).
    abstract: {item: pytree of arrays or jax.ShapeDtypeStruct} with the target structure,
    shapes, dtypes and shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    args = {k: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract[k]))
            for k in ITEMS}
    out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **args))
    return {k: out[k] for k in ITEMS}, out["meta"], step

  def close(self) -> None:
    self.manager.close()
