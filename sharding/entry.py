"""What every entry point (`Trainer`, `Generator`, `from_pretrained`, the CLIs) needs from the mesh.

One program, any mesh: an entry point takes `mesh=None, rules=None`; None means `default_mesh()`
(every device of every process on the `fsdp` axis; one device is a mesh of one) and the default
`ShardingRules`. There is no unsharded code path.

  resolve_mesh        None | "fsdp=4,expert=2" | {name: size} | Mesh -> Mesh
  tree_shardings      NamedShardings for a pytree of nnx Variables (by their logical axes) and
                      plain leaves (replicated): parameters, optimizer state, router bias
  variable_sharding   the (path, abstract Variable) -> Sharding callable `from_pretrained` takes
  shardings_arg       a loader's (shardings, mesh, rules) arguments -> that callable (or None)
  global_batch        a process-local host batch -> one global jax.Array (multi-host input)
  process_rows        which rows of the global batch this process feeds
  to_host             a (possibly not fully addressable) jax.Array -> numpy on every process
  check_fits          parameter + optimizer bytes per device against the device's memory
  add_mesh_arguments / mesh_from_args / start_distributed   the CLI flags (--mesh, multi-host)
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv3_jax.errors import UserError

from dsv3_jax.sharding.mesh import (DATA, EXPERT, FSDP, TENSOR, add_distributed_arguments,
                                    initialize_distributed, make_mesh, parse_mesh_shape)
from dsv3_jax.sharding.rules import ShardingRules, variable_spec

__all__ = ["KNOWN_AXES", "default_mesh", "resolve_mesh", "tree_shardings", "variable_sharding",
           "shardings_arg", "replicated", "global_batch", "process_rows",
           "to_host", "sharded_nbytes", "device_memory_bytes",
           "MemoryBudgetError", "check_fits", "add_mesh_arguments", "mesh_from_args",
           "multi_host_environment", "start_distributed"]

KNOWN_AXES = (DATA, FSDP, EXPERT, TENSOR)
MESH_HELP = ("device mesh as name=size pairs over the axes data, fsdp, expert, tensor, e.g. "
             "fsdp=4,expert=2; one size may be -1 (= the remaining devices). Default: every "
             "device on fsdp (a mesh of one on one device)")
GiB = 1024 ** 3


def default_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Every device (of every process) on one `fsdp` axis: parameters, optimizer state and the
  batch are split over all of them by the default rules; on one device, a mesh of one."""
  return make_mesh({FSDP: -1}, devices=devices)


def resolve_mesh(mesh: Mesh | Mapping[str, int] | str | None) -> Mesh:
  """None -> `default_mesh()`; "fsdp=4,expert=2" or {name: size} -> `make_mesh`; a Mesh as is."""
  if mesh is None:
    return default_mesh()
  if isinstance(mesh, Mesh):
    return mesh
  return make_mesh(mesh)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _path_str(path) -> str:
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def tree_shardings(tree: Any, rules: ShardingRules, mesh: Mesh) -> Any:
  """The pytree `tree` with every leaf replaced by its NamedSharding: an nnx.Variable by its
  `axes` metadata through `rules` (a dim not divisible by its mesh axes is replicated), any other
  leaf (an optimizer step count, an RNG key) replicated. Works on abstract trees
  (`jax.eval_shape`, `nnx.eval_shape`); optax moments keep their parameter's Variable type and
  axes, so they get exactly their parameter's sharding."""
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree)

  def leaf(path, x):
    if isinstance(x, nnx.Variable):
      return x.replace(NamedSharding(mesh, variable_spec(x, rules, mesh, _path_str(path))))
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(leaf, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def variable_sharding(mesh: Mesh, rules: ShardingRules | None = None):
  """(path, abstract nnx.Variable) -> NamedSharding: the `shardings=` callable of
  `from_pretrained` / `dsv3_jax.param_tree.restore_arrays` for `mesh` and `rules`."""
  rules = rules or ShardingRules()

  def fn(path: str, var: nnx.Variable) -> NamedSharding:
    return NamedSharding(mesh, variable_spec(var, rules, mesh, path))

  return fn


def shardings_arg(shardings: Any, mesh: Mesh | Mapping[str, int] | str | None,
                  rules: ShardingRules | None):
  """The `shardings=` of a loader from its (shardings, mesh, rules) arguments: `shardings` as
  given, or `variable_sharding(mesh, rules)` when a mesh (or rules: then the default mesh) is
  given; None when neither is (the default device). Raises if both shardings and mesh/rules are."""
  if mesh is None and rules is None:
    return shardings
  if shardings is not None:
    raise ValueError("pass either shardings= or mesh=/rules=, not both")
  return variable_sharding(resolve_mesh(mesh), rules)


def global_batch(local: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]
                 ) -> jax.Array:
  """One global array of `global_shape` from each process's rows.

  local: this process's part [global_shape[0] / process_count, ...] (in process-index order along
  the batch dim), or the whole batch [global_shape] (then every process must pass the same data;
  always the case with one process). sharding: the batch's NamedSharding (e.g.
  `activation_sharding(("batch", "sequence"), rules, mesh, global_shape)`).
  """
  local = np.asarray(local)
  if tuple(local.shape) == tuple(global_shape):
    return jax.make_array_from_callback(tuple(global_shape), sharding, lambda idx: local[idx])
  return jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> tuple[int, int]:
  """(shard_index, num_shards) of the rows (dim 0) this process must feed for a batch of
  `global_shape` placed with `sharding`: its devices hold rows [shard_index * n, (shard_index + 1)
  * n) with n = global_shape[0] / num_shards (num_shards 1 when the batch is replicated across
  processes). The `TokenDataset(shard_index=, num_shards=)` arguments of a multi-process run."""
  B = global_shape[0]
  idx = sharding.addressable_devices_indices_map(tuple(global_shape)).values()
  lo = min((i[0].start or 0) for i in idx)
  hi = max((B if i[0].stop is None else i[0].stop) for i in idx)
  n = hi - lo
  if B % n or lo % n:
    raise ValueError(f"this process's batch rows {lo}..{hi} of {B} are not one of equal shards")
  return lo // n, B // n


def to_host(x: jax.Array) -> np.ndarray:
  """A jax.Array as numpy on every process (gathers shards other processes hold)."""
  if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def sharded_nbytes(abstract: Any, shardings: Any) -> int:
  """Bytes one device holds of the pytree `abstract` (arrays or ShapeDtypeStructs, nnx Variables
  allowed) placed with the matching pytree of `shardings` (largest shard per leaf)."""
  leaves = jax.tree.leaves(abstract)
  shards = jax.tree.leaves(shardings)
  if len(leaves) != len(shards):
    raise ValueError(f"{len(leaves)} arrays but {len(shards)} shardings")
  total = 0
  for a, s in zip(leaves, shards):
    shape = tuple(s.shard_shape(tuple(a.shape)))
    total += math.prod(shape) * np.dtype(a.dtype).itemsize
  return total


def _host_available_bytes() -> int | None:
  """MemAvailable from /proc/meminfo, else physical pages x page size (os.sysconf)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def device_memory_bytes(device: jax.Device | None = None) -> tuple[int | None, str]:
  """(bytes one device can hold, where the figure comes from). Accelerators: the runtime's
  `memory_stats()["bytes_limit"]`; CPU: available host memory divided by the local CPU devices
  (simulated devices share the host). (None, reason) when unknown."""
  device = device or jax.local_devices()[0]
  if device.platform != "cpu":
    try:
      stats = device.memory_stats() or {}
    except Exception:  # some runtimes do not implement memory_stats
      stats = {}
    if stats.get("bytes_limit"):
      return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    return None, f"{device.device_kind} reports no memory limit"
  avail = _host_available_bytes()
  if avail is None:
    return None, "host memory unknown"
  n = len([d for d in jax.local_devices() if d.platform == "cpu"]) or 1
  return avail // n, ("available host memory" if n == 1 else
                      f"available host memory / {n} CPU devices")


class MemoryBudgetError(ValueError, UserError):
  """The state alone does not fit the devices of the mesh."""


def check_fits(need_bytes: int, mesh: Mesh, what: str, *, hint: str = "") -> None:
  """Raises MemoryBudgetError (one line) when `need_bytes` per device exceed what a device of
  `mesh` holds (see `device_memory_bytes`); does nothing when that is unknown."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  have, source = device_memory_bytes(local[0] if local else None)
  if have is None or need_bytes <= have:
    return
  shape = ",".join(f"{n}={s}" for n, s in zip(mesh.axis_names, mesh.axis_sizes))
  raise MemoryBudgetError(
      f"{what} needs {need_bytes / GiB:.1f} GiB per device on mesh {shape}, but a device has "
      f"{have / GiB:.1f} GiB ({source})" + (f"; {hint}" if hint else ""))


def add_mesh_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds --mesh and the multi-host flags (--coordinator, --num-processes, --process-id,
  --cpu-collectives) to a CLI parser."""
  parser.add_argument("--mesh", default=None, metavar="NAME=SIZE,...", help=MESH_HELP)
  add_distributed_arguments(parser)


def multi_host_environment(env: Mapping[str, str] | None = None) -> bool:
  """Whether the environment describes a job of several processes that JAX's own cluster
  detection can join without flags: a multi-host TPU slice (TPU_WORKER_HOSTNAMES lists several
  hosts), or a SLURM / Open MPI job of more than one task."""
  env = os.environ if env is None else env
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]

  def count(name):
    try:
      return int(env.get(name, "1") or "1")
    except ValueError:
      return 1

  return len(hosts) > 1 or count("SLURM_NTASKS") > 1 or count("OMPI_COMM_WORLD_SIZE") > 1


def start_distributed(args: argparse.Namespace) -> bool:
  """`initialize_distributed` from the CLI flags / DSV3_* variables, or from the cluster's own
  variables when `multi_host_environment()`; call before anything touches a device. Raises
  ValueError (one line) for incomplete flags. Returns whether JAX was initialised."""
  return initialize_distributed(args, force=multi_host_environment())


def mesh_from_args(spec: str | None) -> Mesh:
  """The mesh of a `--mesh` flag value (None: `default_mesh()`). Raises ValueError with a
  one-line message naming the flag for a malformed spec, an unknown axis name or a shape that
  does not match the device count."""
  if spec is None:
    return default_mesh()
  try:
    sizes = parse_mesh_shape(spec)
    if not sizes:
      raise ValueError("no axes given")
    unknown = [n for n in sizes if n not in KNOWN_AXES]
    if unknown:
      raise ValueError(f"unknown axis {unknown[0]!r} (known: {', '.join(KNOWN_AXES)})")
    return make_mesh(sizes)
  except ValueError as e:
    raise MeshFlagError(f"--mesh {spec!r}: {e}") from None


class MeshFlagError(ValueError, UserError):
  """A malformed --mesh / multi-host flag (the message names the flag)."""


def cli_mesh(args: argparse.Namespace) -> Mesh:
  """What a CLI does before anything else: multi-host start-up (`start_distributed`), then the
  mesh of its `--mesh` flag (`mesh_from_args`). Raises MeshFlagError (a ValueError and a
  `dsv3_jax.errors.UserError`) with a one-line message naming the flags at fault."""
  try:
    start_distributed(args)
  except ValueError as e:
    raise MeshFlagError(f"--coordinator/--num-processes/--process-id: {e}") from None
  return mesh_from_args(args.mesh)
