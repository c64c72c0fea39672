"""Logical axis names -> mesh axes: the one table that decides the parallelism.

Every model variable carries logical axis names in its `axes` metadata (vocab, embed, q_lora,
kv_lora, heads, mlp, expert, moe_embed, moe_mlp, layers (the leading axis of a scanned layer
stack), or None). `ShardingRules` maps each name to zero, one or
several mesh axes; changing the parallelism is editing this table, never the model.

Weight axes and activation axes are separate fields (an activation's hidden dim is usually
replicated while the weight's `embed` dim is FSDP-sharded). Mesh axes that are absent from the
mesh at hand (or have size 1) are dropped, so one table serves every mesh shape; a dimension not
divisible by its mesh axes' total size is replicated rather than failing (the memory planner
reports such dims).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv3_jax.sharding.mesh import DATA, EXPERT, FSDP, TENSOR

__all__ = ["ShardingRules", "WEIGHT_AXES", "ACTIVATION_AXES", "logical_to_spec",
           "variable_spec", "state_specs", "state_shardings", "shard_model", "init_sharded",
           "activation_sharding", "use_rules", "current_rules", "wide_expert", "POD_RULES",
           "SERVE_POD_RULES", "rules_for_mesh"]

MeshAxes = str | tuple[str, ...] | None

WEIGHT_AXES = ("vocab", "embed", "q_lora", "kv_lora", "heads", "mlp", "expert", "moe_embed",
               "moe_mlp", "layers", "lora_in")
ACTIVATION_AXES = ("batch", "sequence", "act_embed", "act_heads", "act_vocab")


def _as_tuple(v: MeshAxes) -> tuple[str, ...]:
  if v is None:
    return ()
  return (v,) if isinstance(v, str) else tuple(v)


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """Mesh axes for each logical axis. A value is a mesh-axis name, a tuple of names, or None.

  Defaults: 2-D weights are FSDP-sharded on `embed` and tensor-parallel on the head/FFN/vocab
  dim; routed experts are split over `expert` (expert parallelism) and their FFN width over
  `tensor`; the batch is split over every data-like axis (data, fsdp and expert: expert shards
  also process distinct tokens outside the MoE).
  """

  # Weight axes.
  vocab: MeshAxes = TENSOR
  embed: MeshAxes = FSDP
  q_lora: MeshAxes = None
  kv_lora: MeshAxes = None
  heads: MeshAxes = TENSOR
  mlp: MeshAxes = TENSOR
  expert: MeshAxes = EXPERT
  # The hidden-size dim of the routed experts' weights (FSDP like `embed` by default). Wide expert
  # parallelism (`wide_expert`) puts it on None and spreads `expert` over the FSDP axis as well:
  # each device then holds whole experts, never gathered, their gradients never reduced.
  moe_embed: MeshAxes = FSDP
  moe_mlp: MeshAxes = TENSOR
  layers: MeshAxes = None  # the leading axis of scanned layer stacks (scan needs it whole)
  # The hidden-size input dim of the low-rank down-projections q_a_proj / kv_a_proj_with_mqa
  # (embed by default). Serving on a pod splits it over every device: their outputs (1536 / 576)
  # are too narrow to split and would otherwise be read whole by every device in each step.
  lora_in: MeshAxes = FSDP
  # Activation axes.
  batch: MeshAxes = (DATA, FSDP, EXPERT)
  sequence: MeshAxes = None
  act_embed: MeshAxes = None
  act_heads: MeshAxes = TENSOR
  act_vocab: MeshAxes = TENSOR

  def __post_init__(self):
    for f in dataclasses.fields(self):
      axes = _as_tuple(getattr(self, f.name))
      if len(set(axes)) != len(axes):
        raise ValueError(f"ShardingRules.{f.name}={getattr(self, f.name)!r} names a mesh axis twice")
    # A weight may combine any of its logical axes; the pairs that occur in this model must not
    # collide ("colliding physical axes"): e.g. embed and moe_mlp both on "tensor".
    for group in (("vocab", "embed"), ("lora_in", "q_lora"), ("lora_in", "kv_lora"),
                  ("q_lora", "heads"), ("kv_lora", "heads"), ("heads", "embed"),
                  ("embed", "mlp"), ("expert", "moe_embed", "moe_mlp")):
      seen: dict[str, str] = {}
      for name in group:
        for ax in _as_tuple(getattr(self, name)):
          if ax in seen:
            raise ValueError(f"ShardingRules: mesh axis {ax!r} is used by both {seen[ax]!r} and "
                             f"{name!r}, which occur in the same weight")
          seen[ax] = name
    act = [a for n in ACTIVATION_AXES[:2] for a in _as_tuple(getattr(self, n))]
    if len(set(act)) != len(act):
      raise ValueError(f"ShardingRules: batch and sequence share a mesh axis: {act}")

  def replace(self, **kw) -> "ShardingRules":
    return dataclasses.replace(self, **kw)

  def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
    """Mesh axes of one logical name (None -> replicated)."""
    if logical is None:
      return ()
    if logical not in WEIGHT_AXES + ACTIVATION_AXES:
      raise KeyError(f"unknown logical axis {logical!r}; known: {WEIGHT_AXES + ACTIVATION_AXES}")
    return _as_tuple(getattr(self, logical))


# The rules for a mesh without a `tensor` axis (a pod sharded over fsdp x expert): the dense head /
# FFN / vocab dims over `expert`, so every weight is split (ZeRO-3 over fsdp x expert). The low-rank
# attention projections are split over both axes too: q_a / kv_a [hidden (lora_in: expert), rank
# (q_lora / kv_lora: fsdp)], q_b / kv_b [rank (fsdp), heads (expert)]; over one axis only, their
# fp32 parameters, Adam moments and gradients cost 3.8 GiB per device more at 671B on 256 devices.
POD_RULES = ShardingRules(vocab=EXPERT, heads=EXPERT, mlp=EXPERT, lora_in=EXPERT, q_lora=FSDP,
                          kv_lora=FSDP)
# Serving also splits the hidden-size input of q_a / kv_a over every device: each device then
# reads 1/n of them per step instead of all (1.8 GB of a 671B decode step on 64 chips).
SERVE_POD_RULES = POD_RULES.replace(lora_in=(FSDP, EXPERT), q_lora=None, kv_lora=None)


def rules_for_mesh(mesh_sizes: Mapping[str, int] | Mesh | None, serve: bool = False
                   ) -> ShardingRules:
  """The rules a mesh gets when none are given (`Trainer`, `dsv3 train`, the serving engine and
  `dsv3 plan` alike, so that a plan compiles what a run places): `ShardingRules()` on a mesh with
  a `tensor` axis of size > 1 (or no mesh), else `POD_RULES` (`SERVE_POD_RULES` when serve)."""
  if isinstance(mesh_sizes, Mesh):
    mesh_sizes = dict(zip(mesh_sizes.axis_names, map(int, mesh_sizes.axis_sizes)))
  if not mesh_sizes or mesh_sizes.get(TENSOR, 1) > 1 or math.prod(mesh_sizes.values()) == 1:
    return ShardingRules()
  return SERVE_POD_RULES if serve else POD_RULES


def wide_expert(rules: ShardingRules, mesh_sizes: Mapping[str, int],
                num_experts: int | None = None) -> ShardingRules:
  """`rules` with the routed experts spread over every mesh axis of size > 1 but `tensor` (in
  mesh order, e.g. expert=(fsdp, expert)) and their hidden dim (`moe_embed`) whole: on a mesh of
  as many such devices as experts, each device holds whole experts (one each at E = devices),
  which the expert-parallel exchange reaches over all those axes. No expert weight is
  all-gathered and no expert-weight gradient is reduced; dense weights keep `rules`.
  Raises ValueError when `num_experts` does not split evenly over those devices."""
  axes = tuple(a for a, n in mesh_sizes.items() if a != TENSOR and n > 1)
  shards = math.prod(mesh_sizes[a] for a in axes)
  if num_experts is not None and shards > 1 and num_experts % shards:
    raise ValueError(f"wide expert parallelism: {num_experts} routed experts do not split over "
                     f"the {shards} devices of mesh axes {'x'.join(axes)}")
  if not axes:
    return rules.replace(moe_embed=None)
  return rules.replace(expert=axes[0] if len(axes) == 1 else axes, moe_embed=None)


def logical_to_spec(logical: tuple[str | None, ...], rules: ShardingRules, mesh: Mesh,
                    shape: tuple[int, ...] | None = None, *, what: str = "") -> P:
  """PartitionSpec for an array with the given logical axes on `mesh`.

  Mesh axes not in the mesh or of size 1 are dropped; with `shape`, a dim not divisible by its
  mesh axes' product is replicated. Raises if one mesh axis would shard two dims.
  """
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  parts, used = [], {}
  for d, name in enumerate(logical):
    axes = tuple(a for a in rules.mesh_axes(name) if sizes.get(a, 1) > 1)
    if shape is not None and axes and shape[d] % math.prod(sizes[a] for a in axes):
      axes = ()
    for a in axes:
      if a in used:
        raise ValueError(f"{what or 'array'} with logical axes {logical}: mesh axis {a!r} shards "
                         f"both dim {used[a]} ({logical[used[a]]}) and dim {d} ({name})")
      used[a] = d
    parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while parts and parts[-1] is None:
    parts.pop()
  return P(*parts)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def variable_spec(var: nnx.Variable, rules: ShardingRules, mesh: Mesh, what: str = "") -> P:
  """PartitionSpec of one nnx.Variable from its `axes` metadata (no metadata -> replicated)."""
  value = var.get_value()
  axes = var.get_metadata().get("axes")
  if axes is None:
    return P()
  if len(axes) != len(value.shape):
    raise ValueError(f"{what}: axes {axes} do not match shape {tuple(value.shape)}")
  return logical_to_spec(tuple(axes), rules, mesh, tuple(value.shape), what=what)


def _map_vars(fn: Callable[[str, nnx.Variable], Any], state) -> Any:
  def leaf(path, v):
    return fn(".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), v)
  return jax.tree_util.tree_map_with_path(leaf, state, is_leaf=_is_var)


def state_specs(state, rules: ShardingRules, mesh: Mesh):
  """The `nnx.State` (or model) tree with each Variable replaced by its PartitionSpec."""
  if isinstance(state, nnx.Module):
    state = nnx.state(state)
  return _map_vars(lambda p, v: v.replace(variable_spec(v, rules, mesh, p)), state)


def state_shardings(state, rules: ShardingRules, mesh: Mesh):
  """Like `state_specs` with NamedShardings: usable as jit in/out_shardings or for device_put."""
  if isinstance(state, nnx.Module):
    state = nnx.state(state)
  return _map_vars(lambda p, v: v.replace(NamedSharding(mesh, variable_spec(v, rules, mesh, p))),
                   state)


def shard_model(model: nnx.Module, rules: ShardingRules, mesh: Mesh) -> nnx.Module:
  """Moves an existing model's variables onto `mesh` per `rules` (in place); returns the model."""
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, state_shardings(state, rules, mesh)))
  return model


def init_sharded(constructor: Callable[[], nnx.Module], rules: ShardingRules, mesh: Mesh
                 ) -> nnx.Module:
  """Builds `constructor()` with every variable created directly in its shard (no full copy).

  The constructor runs once abstractly (`nnx.eval_shape`) to read shapes and axes, then under
  jit with out_shardings, so each device materialises only its own slice.
  """
  abstract = nnx.eval_shape(constructor)
  graphdef, abs_state = nnx.split(abstract)
  shardings = state_shardings(abs_state, rules, mesh)

  make = jax.jit(lambda: nnx.state(constructor()), out_shardings=shardings)
  return nnx.merge(graphdef, make())


def activation_sharding(logical: tuple[str | None, ...], rules: ShardingRules, mesh: Mesh,
                        shape: tuple[int, ...] | None = None) -> NamedSharding:
  """NamedSharding for an activation, e.g. tokens ("batch", "sequence") or logits
  ("batch", "sequence", "act_vocab")."""
  return NamedSharding(mesh, logical_to_spec(logical, rules, mesh, shape))


_RULES: contextvars.ContextVar[ShardingRules | None] = contextvars.ContextVar("dsv3_rules",
                                                                               default=None)


@contextlib.contextmanager
def use_rules(rules: ShardingRules | None):
  """The rules the model's explicit collectives (`gathered`, `kernel_map`) assume while tracing,
  beside the ambient mesh of `jax.set_mesh`: entry points that place parameters with `rules`
  trace their steps under `with jax.set_mesh(mesh), use_rules(rules):`. None: the defaults."""
  token = _RULES.set(rules)
  try:
    yield rules
  finally:
    _RULES.reset(token)


def current_rules() -> ShardingRules:
  """The rules set by the innermost `use_rules`, else `ShardingRules()`."""
  return _RULES.get() or ShardingRules()
