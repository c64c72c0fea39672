"""Where a Pallas kernel meets the mesh: one `shard_map` built from the operands' logical axes.

A Mosaic (TPU) or Triton/Mosaic GPU kernel is an opaque custom call that GSPMD cannot partition
("Mosaic kernels cannot be automatically partitioned"). `kernel_map` runs such a kernel once per
shard instead: the caller names each operand dim with a logical axis (the activation names of
`ShardingRules`: "batch", "act_heads", ..., or weight names), this module resolves them to mesh
axes of the ambient mesh (`jax.set_mesh`) and wraps the call in `jax.shard_map`. A dim named
None is whole on every shard (e.g. the sequence of causal attention, which the kernel cannot
split); GSPMD gathers it before the call if it was sharded.

Resolution, per logical name in order of first appearance over the operands: the name's mesh
axes (`rules.mesh_axes`) that are in the mesh with size > 1, not manual (inside an enclosing
shard_map), not taken by an earlier name, kept greedily while their product divides every dim
carrying that name (and leaves each local size a multiple of `Dim.multiple`). Dropped axes mean
that dim is replicated, never a wrong result. With no mesh, or no axis left, the kernel is called
directly. Operands on Explicit mesh axes are resharded to the kernel's specs first (shard_map
requires it); on Auto axes (`make_mesh`'s) GSPMD inserts the same collectives.

This module imports nothing from the model.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from dsv3_jax.errors import UserError
from dsv3_jax.sharding.rules import ShardingRules, current_rules

__all__ = ["Dim", "KernelShardingError", "kernel_map", "kernel_specs"]


@dataclasses.dataclass(frozen=True)
class Dim:
  """A dim with logical axis `name` whose per-shard size must stay a multiple of `multiple`
  (e.g. 128-row blocks that share one FP8 scale must not be cut by a shard boundary)."""

  name: str
  multiple: int = 1


AxisName = str | Dim | None
Axes = tuple[AxisName, ...]


class KernelShardingError(ValueError, UserError):
  """A kernel cannot run on the sharding at hand (names the kernel, operand, specs, shapes)."""


def _is_axes(x) -> bool:
  return isinstance(x, tuple) and all(a is None or isinstance(a, (str, Dim)) for a in x)


def _name(a: AxisName) -> str | None:
  return a.name if isinstance(a, Dim) else a


def _free_axes(mesh) -> dict[str, int]:
  """Mesh axes a kernel may be split over: size > 1 and not already manual."""
  manual = set(getattr(mesh, "manual_axes", ()) or ())
  return {a: s for a, s in zip(mesh.axis_names, mesh.axis_sizes) if s > 1 and a not in manual}


def kernel_specs(shapes: Sequence[tuple[int, ...] | None], in_axes: Sequence[Axes | None],
                 out_axes: Sequence[Axes], mesh: Mesh | AbstractMesh,
                 rules: ShardingRules | None = None, *, name: str = "kernel"
                 ) -> tuple[list[P | None], list[P], tuple[str, ...]]:
  """The shard_map specs of a kernel call (see the module docstring for the resolution rule).

  shapes: per operand its global shape (None: the operand is absent); in_axes: per operand one
  logical name per dim (None: the operand is replicated); out_axes: per output one logical name
  per dim, using only names that also occur in an operand. Returns (in_specs (None for absent
  operands), out_specs, the mesh axes used).
  """
  rules = rules or current_rules()
  free = _free_axes(mesh)
  dims: dict[str, list[tuple[int, int]]] = {}
  for i, (shape, axes) in enumerate(zip(shapes, in_axes)):
    if shape is None or axes is None:
      continue
    if len(axes) != len(shape):
      raise KernelShardingError(f"{name}: operand {i} has shape {tuple(shape)} but logical axes "
                                f"{axes} ({len(axes)} names for {len(shape)} dims)")
    for d, a in zip(shape, axes):
      if a is not None:
        rules.mesh_axes(_name(a))  # unknown names raise KeyError here
        dims.setdefault(_name(a), []).append((d, a.multiple if isinstance(a, Dim) else 1))
  for j, axes in enumerate(out_axes):
    for a in axes:
      if a is not None and _name(a) not in dims:
        raise KernelShardingError(f"{name}: output {j} names logical axis {_name(a)!r}, which no "
                                  f"operand carries, so its sharding is unknown")
  taken: set[str] = set()
  resolved: dict[str, tuple[str, ...]] = {}
  for logical, occurrences in dims.items():
    keep: list[str] = []
    for ax in rules.mesh_axes(logical):
      if ax not in free or ax in taken:
        continue
      n = math.prod(free[a] for a in keep) * free[ax]
      if all(d % n == 0 and (d // n) % m == 0 for d, m in occurrences):
        keep.append(ax)
    taken.update(keep)
    resolved[logical] = tuple(keep)

  def spec(axes: Axes) -> P:
    parts = [resolved.get(_name(a), ()) if a is not None else () for a in axes]
    return P(*[None if not p else p[0] if len(p) == 1 else p for p in parts])

  in_specs = [None if shape is None else P() if axes is None else spec(axes)
              for shape, axes in zip(shapes, in_axes)]
  return in_specs, [spec(a) for a in out_axes], tuple(sorted(taken))


def kernel_map(fn: Callable[..., Any], in_axes: Sequence[Axes | None],
               out_axes: Axes | Sequence[Axes], *, rules: ShardingRules | None = None, mesh: Mesh | AbstractMesh | None = None,
               name: str | None = None) -> Callable[..., Any]:
  """Returns `fn` run per shard over the mesh, for a kernel whose operands carry logical axes.

  Args:
    fn: the kernel call, fn(*operands) -> array or tuple of arrays, positional operands only
      (close over static arguments). Operands passed as None reach fn as None (optional inputs).
    in_axes: per operand a tuple of logical axis names, one per dim (None for a dim the kernel
      needs whole; `Dim(name, multiple)` for a dim whose local size must stay a multiple of
      `multiple`), or None for an operand every shard needs entirely.
    out_axes: the output's axes (one tuple), or a sequence of them for a tuple output.
    rules: logical -> mesh axes (default `current_rules()`: those of the enclosing `use_rules`).
    mesh: default the ambient mesh (`jax.sharding.get_abstract_mesh()`, set by `jax.set_mesh`).
    name: the kernel's name in error messages.

  Example: attention o [B, T, H, V] from q, k [B, T, H, K], v [B, T, H, V], seg [B, T]:
    qa = ("batch", None, "act_heads", None)
    kernel_map(lambda q, k, v, s: mla_attention(...), (qa, qa, qa, ("batch", None)), qa)(...)

  The shard_map runs with check_vma=False: pallas_call (jax 0.10-0.12) gives its outputs no
  varying-manual-axes type, which check_vma=True rejects; each output is, by construction,
  varying exactly over the mesh axes of its spec (the kernel is per-shard independent), and the
  transpose (gradients) psums replicated operands' cotangents over the axes they are not split on.
  A kernel that rejects its per-shard shapes raises `KernelShardingError` with the specs and the
  local shapes; there is no fallback to another implementation.
  """
  name = name or getattr(fn, "__name__", "kernel")
  single = _is_axes(out_axes)
  outs = [out_axes] if single else list(out_axes)
  if not all(_is_axes(a) for a in outs):
    raise TypeError(f"{name}: out_axes must be a tuple of logical axis names or a sequence of "
                    f"them, got {out_axes!r}")

  def call(*args):
    if len(args) != len(in_axes):
      raise TypeError(f"{name}: {len(args)} operands but {len(in_axes)} in_axes")
    m = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if m is None or m.empty or not _free_axes(m):
      return fn(*args)
    shapes = [None if a is None else tuple(a.shape) for a in args]
    in_specs, out_specs, used = kernel_specs(shapes, in_axes, outs, m, rules, name=name)
    if not used:
      return fn(*args)
    present = [i for i, a in enumerate(args) if a is not None]

    def body(*local):
      full = [None] * len(args)
      for i, x in zip(present, local):
        full[i] = x
      try:
        out = fn(*full)
      except (ValueError, TypeError, NotImplementedError) as e:
        local_shapes = [tuple(x.shape) for x in local]
        raise KernelShardingError(
            f"{name} cannot run on this sharding: mesh {dict(zip(m.axis_names, m.axis_sizes))}, "
            f"operand specs {[in_specs[i] for i in present]}, per-shard shapes {local_shapes} "
            f"(global {[shapes[i] for i in present]}): {type(e).__name__}: {e}") from e
      return out if single else tuple(out)

    free = set(_free_axes(m))
    manual = set(m.axis_names) - free - {a for a, s in zip(m.axis_names, m.axis_sizes) if s == 1}
    kw = {"axis_names": frozenset(free)} if manual else {}
    mapped = jax.shard_map(body, mesh=m, in_specs=tuple(in_specs[i] for i in present),
                           out_specs=out_specs[0] if single else tuple(out_specs),
                           check_vma=False, **kw)
    operands = [args[i] for i in present]
    if set(getattr(m, "explicit_axes", ()) or ()) & free:
      # Explicit-sharding axes: shard_map requires operands already laid out as its in_specs.
      operands = [jax.sharding.reshard(x, in_specs[i]) for i, x in zip(present, operands)]
    with jax.named_scope(f"kernel_map_{name}"):
      return mapped(*operands)

  return call
