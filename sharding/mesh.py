"""Device meshes from named axis sizes, and multi-host start-up on JAX's own runtime.

The mesh spans every device of every process (`jax.devices()`, not `jax.local_devices()`), so the
same code runs on one host with 8 simulated CPU devices and on a TPU pod slice with one process
per host. Mesh axes are named; the conventional names are DATA, FSDP, EXPERT and TENSOR, which
the default `ShardingRules` and the expert-parallel MoE refer to.
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

__all__ = ["DATA", "FSDP", "EXPERT", "TENSOR", "make_mesh", "parse_mesh_shape",
           "DistributedConfig", "add_distributed_arguments", "initialize_distributed",
           "TPU_COMPILE_OPTIONS", "TPU_TRAIN_COMPILE_OPTIONS", "compile_options_for"]

DATA, FSDP, EXPERT, TENSOR = "data", "fsdp", "expert", "tensor"

# libtpu compile options for every program this package compiles for TPU devices (train step,
# model and optimizer init, generation, the serving engine's steps, `dsv3 plan`), so that
# `dsv3 plan` compiles what a run compiles. Each changes how the compiler works, not the program:
# - xla_tpu_enable_sparse_core_computation_deduplication: compile identical SparseCore programs
#   (the collectives and gathers libtpu offloads to the SparseCores, e.g. on tpu7x) once. The
#   5-layer 671B train step on tpu7x:4x4x8: 279 -> 118 SparseCore computations, compile
#   1141 -> 830 CPU-s, peak, temporaries and flops identical (bench/RESULTS.md).
TPU_COMPILE_OPTIONS: dict[str, object] = {
    "xla_tpu_enable_sparse_core_computation_deduplication": True,
}


# On top of TPU_COMPILE_OPTIONS for training programs (the Trainer's step and init, `dsv3 plan
# --mode train`):
# - xla_tpu_enable_collective_pipeliner=False: XLA's collective pipeliner moves a layer loop's
#   communication across iterations by peeling one iteration out of the loop (seen with the
#   layer-input offload remat): every layer loop (dense and MoE stacks, forward and backward)
#   was compiled twice. Off, the 671B train step (61 layers + MTP, v5p:4x4x16, fsdp 16 x expert
#   16, wide rules, offload remat) compiled in 114-120 s instead of 143 s on a quiet host, with
#   the same peak and flops (bench/RESULTS.md). At run time a layer's gathers and host copies
#   then overlap that layer's own compute (the latency-hiding scheduler), not the neighbouring
#   layer's; under wide expert parallelism the gathers are the attention projections, shared
#   expert and router (the routed experts are not gathered). Serving programs keep the
#   pipeliner (a decode layer is too short to hide its own gathers). A caller's option wins, e.g.
#   `Trainer(compiler_options={"xla_tpu_enable_collective_pipeliner": True})`.
# - xla_tpu_enable_sparse_core_collective_offload_all_reduce=False: where libtpu offloads
#   all-reduces to the SparseCores (tpu7x), it also rewrites each FSDP all-gather into a
#   zero-filled buffer plus a SparseCore all-reduce, and compiles a SparseCore program per distinct
#   collective whose compile time grows with the devices in it (one all-gather of a [7168, 2048]
#   weight over 256 tpu7x devices: 9.4 s with the offload, 2.2 s without; 1.6 s on 16 devices).
#   The 671B train step (tpu7x:4x4x8, fsdp 16 x expert 16, wide rules, offload remat) had 96
#   SparseCore programs (47 with every collective offload off: the rest are gathers, scatters
#   and sorts); off: 477 -> 275 s compile (903 -> 514 CPU-s) on one host, same peak and flops
#   (bench/RESULTS.md). At run time the all-gathers then stay all-gathers on the TensorCores'
#   DMA engines (as on v5p and v6e), moving half an all-reduce's bytes; the gradient
#   reduce-scatters are not affected.
TPU_TRAIN_COMPILE_OPTIONS: dict[str, object] = {
    "xla_tpu_enable_collective_pipeliner": False,
    "xla_tpu_enable_sparse_core_collective_offload_all_reduce": False,
}


def compile_options_for(mesh, options: Mapping[str, object] | None = None, *,
                        train: bool = False) -> dict[str, object]:
  """XLA compile options for a program over `mesh` (a Mesh, or None for the default device):
  `TPU_COMPILE_OPTIONS` (and `TPU_TRAIN_COMPILE_OPTIONS` for a training program, `train`) when
  its devices are TPUs (real or a libtpu topology's), then `options` (the caller's own, which win
  on a clash). Other platforms get `options` alone."""
  devices = mesh.devices.flat if mesh is not None else jax.devices()[:1]
  if next(iter(devices)).platform != "tpu":
    return dict(options or {})
  return {**TPU_COMPILE_OPTIONS, **(TPU_TRAIN_COMPILE_OPTIONS if train else {}), **(options or {})}


def parse_mesh_shape(spec: str) -> dict[str, int]:
  """"data=2,expert=4" -> {"data": 2, "expert": 4} (order kept; `-1` means "the rest")."""
  out: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, size = part.partition("=")
    if not sep or not name.strip():
      raise ValueError(f"mesh shape {spec!r}: expected name=size entries, got {part!r}")
    try:
      out[name.strip()] = int(size)
    except ValueError:
      raise ValueError(f"mesh shape {spec!r}: size of axis {name.strip()!r} is not an integer: "
                       f"{size!r}") from None
  return out


def make_mesh(axis_sizes: Mapping[str, int] | str, *, devices: Sequence[jax.Device] | None = None,
              ) -> Mesh:
  """A mesh with the given named axis sizes over all devices of all processes.

  axis_sizes: ordered {name: size} (or "data=2,expert=4"); at most one size may be -1 (filled in
  from the device count). The product must equal the number of devices. Axis types are Auto
  (GSPMD propagation outside shard_map; the expert-parallel MoE uses shard_map inside).
  Device order follows `jax.make_mesh`, which places the fastest-varying (last) axes on
  neighbouring devices of one host/ICI ring: put the chattiest axis (tensor, then expert) last.
  """
  if isinstance(axis_sizes, str):
    axis_sizes = parse_mesh_shape(axis_sizes)
  names, sizes = list(axis_sizes), list(axis_sizes.values())
  devices = list(jax.devices() if devices is None else devices)
  if len(set(names)) != len(names):
    raise ValueError(f"mesh axis names repeat: {names}")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive (at most one -1), got {dict(axis_sizes)}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ValueError(f"cannot fill -1 in {dict(axis_sizes)}: {len(devices)} devices not divisible "
                       f"by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {len(devices)} are available ({jax.process_count()} process(es))")
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


class DistributedConfig:
  """Multi-controller start-up settings: coordinator "host:port", process count and id.

  Values come from flags, else from the environment variables DSV3_COORDINATOR,
  DSV3_NUM_PROCESSES, DSV3_PROCESS_ID; when none is set on a TPU pod / SLURM / Open MPI job,
  `jax.distributed.initialize()` discovers them itself.
  """

  def __init__(self, coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_collectives: str | None = None,
               timeout_s: int = 300):
    env = os.environ
    self.coordinator = coordinator or env.get("DSV3_COORDINATOR")
    self.num_processes = _int_or_none(num_processes, env.get("DSV3_NUM_PROCESSES"),
                                      "DSV3_NUM_PROCESSES")
    self.process_id = _int_or_none(process_id, env.get("DSV3_PROCESS_ID"), "DSV3_PROCESS_ID")
    self.cpu_collectives = cpu_collectives or env.get("DSV3_CPU_COLLECTIVES")
    self.timeout_s = timeout_s

  @property
  def explicit(self) -> bool:
    return self.coordinator is not None or self.num_processes is not None


def _int_or_none(flag, env_value, env_name):
  if flag is not None:
    return int(flag)
  if env_value in (None, ""):
    return None
  try:
    return int(env_value)
  except ValueError:
    raise ValueError(f"environment variable {env_name}={env_value!r} is not an integer") from None


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds --coordinator, --num-processes, --process-id, --cpu-collectives to a CLI parser."""
  g = parser.add_argument_group("multi-host")
  g.add_argument("--coordinator", default=None,
                 help="coordinator host:port (env DSV3_COORDINATOR); omit on TPU pods (auto)")
  g.add_argument("--num-processes", type=int, default=None, help="env DSV3_NUM_PROCESSES")
  g.add_argument("--process-id", type=int, default=None, help="env DSV3_PROCESS_ID")
  g.add_argument("--cpu-collectives", default=None, choices=["gloo", "mpi"],
                 help="cross-process collectives for the CPU backend (env DSV3_CPU_COLLECTIVES)")


def initialize_distributed(cfg: DistributedConfig | argparse.Namespace | None = None, *,
                           force: bool = False) -> bool:
  """Calls `jax.distributed.initialize` when a multi-process run is configured.

  Must run before any other jax call that touches devices. Returns True if it initialised.
  With no settings it initialises only when `force` (TPU pods and SLURM/MPI jobs auto-detect),
  so a single-process run stays single-process.
  """
  if isinstance(cfg, argparse.Namespace):
    cfg = DistributedConfig(cfg.coordinator, cfg.num_processes, cfg.process_id, cfg.cpu_collectives)
  cfg = cfg or DistributedConfig()
  if cfg.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  if not (cfg.explicit or force):
    return False
  if cfg.explicit and (cfg.coordinator is None or cfg.num_processes is None
                       or cfg.process_id is None):
    raise ValueError("multi-host start-up needs all of coordinator, num_processes and process_id "
                     f"(got {cfg.coordinator!r}, {cfg.num_processes!r}, {cfg.process_id!r})")
  jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                             process_id=cfg.process_id, initialization_timeout=cfg.timeout_s)
  return True
