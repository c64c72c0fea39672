"""Per-device memory estimate on paper: parameters, gradients, AdamW state and activations.

Not a verdict: the activation figure misses what XLA keeps live (expert-parallel exchange
buffers, collectives' buffers, fusion temporaries) and has been an order of magnitude low for the
671B train step. For whether a run fits, compile it: `dsv3 plan` (dsv3_jax.plan), which reports
the compiler's memory_analysis for a TPU topology. This module stays for quick shape-only
parameter/optimizer byte counts.

Nothing is allocated: parameter shapes come from an abstract model (`nnx.eval_shape`), their
per-device share from the same `ShardingRules` the real run uses, resolved on an AbstractMesh
(so a 256-chip mesh can be planned on a laptop), and activations from `jax.eval_shape` of one
block's forward + VJP.

Activation estimate (stated): the VJP closure of one decoder block, `jax.vjp(block, params, x)[1]`,
holds exactly the residuals autodiff keeps for the backward pass; `jax.eval_shape` gives their
shapes. Residuals that are the block's own parameters (matched by shape and dtype) are not
counted again. The block is evaluated at the per-device micro-batch (global batch divided by the
mesh axes the batch is split over), so tensor-parallel splitting of activations inside the block
is ignored (an upper bound for tensor > 1); the residuals are multiplied by the number of blocks
(no remat). The output logits (float32, vocab split as the rules say) are added once.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from dsv3_jax.sharding.rules import ShardingRules, _as_tuple, logical_to_spec

__all__ = ["MemoryPlan", "abstract_mesh", "sharded_bytes", "param_bytes_per_device",
           "activation_bytes", "plan_memory", "format_plan"]

GiB = 1024 ** 3
ADAMW_BYTES_PER_PARAM = 12  # fp32 first moment m, second moment v and fp32 master copy


def abstract_mesh(axis_sizes: Mapping[str, int]) -> AbstractMesh:
  """A device-free mesh of the given named axis sizes (for planning)."""
  names = tuple(axis_sizes)
  return AbstractMesh(tuple(axis_sizes.values()), names, axis_types=(AxisType.Auto,) * len(names))


def sharded_bytes(shape, dtype, spec, mesh) -> int:
  """Bytes one device holds of an array of `shape` laid out by PartitionSpec `spec`."""
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  local = list(shape)
  for d, part in enumerate(spec):
    local[d] = math.ceil(local[d] / math.prod(sizes[a] for a in _as_tuple(part)))
  return math.prod(local) * np.dtype(dtype).itemsize


def param_bytes_per_device(state, rules: ShardingRules, mesh, *, trainable=nnx.Param):
  """-> (param bytes, trainable element count per device, replicated-by-fallback names).

  `state`: an abstract nnx.State (ShapeDtypeStruct leaves). The last item lists variables whose
  logical axes asked for sharding that the shape could not take (dims not divisible).
  """
  total, trainable_elems, fallback = 0, 0, []
  for path, v in nnx.to_flat_state(state):
    name = ".".join(str(p) for p in path)
    value = v.get_value()
    axes = v.get_metadata().get("axes") or (None,) * len(value.shape)
    spec = logical_to_spec(tuple(axes), rules, mesh, tuple(value.shape), what=name)
    wanted = logical_to_spec(tuple(axes), rules, mesh, None, what=name)
    if spec != wanted:
      fallback.append(name)
    b = sharded_bytes(value.shape, value.dtype, spec, mesh)
    total += b
    if isinstance(v, trainable):
      trainable_elems += b // np.dtype(value.dtype).itemsize
  return total, trainable_elems, fallback


def activation_bytes(block: Callable[[Any, jax.Array], jax.Array], block_params, x) -> int:
  """Bytes of the residuals one block's VJP keeps, minus those that are its parameters.

  block(params, x) -> y; block_params a pytree of ShapeDtypeStruct (or arrays); x a
  ShapeDtypeStruct of the block input at the per-device batch.
  """
  residuals = jax.eval_shape(lambda p, h: jax.vjp(block, p, h)[1], block_params, x)
  counts = collections.Counter((tuple(l.shape), np.dtype(l.dtype))
                               for l in jax.tree.leaves(block_params))
  total = 0
  for leaf in jax.tree.leaves(residuals):
    key = (tuple(leaf.shape), np.dtype(leaf.dtype))
    if counts[key] > 0:
      counts[key] -= 1
      continue
    total += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
  return total


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Per-device bytes. optimizer = AdamW m, v and master weights, all float32."""

  mesh_shape: dict[str, int]
  batch: int
  seq: int
  params: int
  grads: int
  optimizer: int
  activations: int
  activations_per_block: int
  blocks: int
  replicated_fallback: tuple[str, ...]

  @property
  def total(self) -> int:
    return self.params + self.grads + self.optimizer + self.activations


def plan_memory(state, rules: ShardingRules, mesh_shape: Mapping[str, int], *, batch: int, seq: int,
                block: Callable | None = None, block_params=None, hidden_size: int | None = None,
                blocks: int = 0, compute_dtype=np.float32, vocab_size: int = 0) -> MemoryPlan:
  """Plans one training step's per-device memory.

  state: abstract nnx.State of the whole model; mesh_shape: {axis: size}; batch, seq: global
  batch and sequence length; block/block_params: one decoder block as block(params, x) (see
  `activation_bytes`), evaluated with x [batch / batch_shards, seq, hidden_size] of
  `compute_dtype`, counted `blocks` times; vocab_size: adds the float32 logits. Gradients are
  counted in the parameter dtype (one full set, as after a backward pass).
  """
  mesh = abstract_mesh(mesh_shape)
  sizes = dict(mesh_shape)
  pbytes, trainable, fallback = param_bytes_per_device(state, rules, mesh)
  pdtype_bytes = {np.dtype(v.get_value().dtype).itemsize
                  for _, v in nnx.to_flat_state(state) if isinstance(v, nnx.Param)}
  grad_bytes = trainable * max(pdtype_bytes or {4})
  batch_shards = math.prod(sizes.get(a, 1) for a in rules.mesh_axes("batch"))
  if batch % batch_shards:
    raise ValueError(f"batch {batch} is not divisible by the {batch_shards} batch shards of "
                     f"mesh {sizes} (rules.batch={rules.batch})")
  local_b = batch // batch_shards
  per_block = 0
  if block is not None:
    x = jax.ShapeDtypeStruct((local_b, seq, hidden_size), compute_dtype)
    per_block = activation_bytes(block, block_params, x)
  logits = 0
  if vocab_size:
    vshards = math.prod(sizes.get(a, 1) for a in rules.mesh_axes("act_vocab"))
    logits = local_b * seq * math.ceil(vocab_size / vshards) * 4
  return MemoryPlan(dict(mesh_shape), batch, seq, pbytes, grad_bytes,
                    trainable * ADAMW_BYTES_PER_PARAM, per_block * blocks + logits, per_block,
                    blocks, tuple(fallback))


def format_plan(plan: MemoryPlan, hbm_gib: float | None = None) -> str:
  """A markdown table row set for one plan (GiB per device)."""
  g = lambda b: f"{b / GiB:,.2f}"
  rows = [("parameters", plan.params), ("gradients", plan.grads),
          ("AdamW m + v + fp32 master", plan.optimizer),
          (f"activations ({plan.blocks} blocks x {g(plan.activations_per_block)} GiB + logits)",
           plan.activations), ("total", plan.total)]
  out = ["| per device | GiB |", "|---|---:|"] + [f"| {k} | {g(v)} |" for k, v in rows]
  if hbm_gib:
    out.append(f"| HBM per chip | {hbm_gib:g} |")
  return "\n".join(out)
