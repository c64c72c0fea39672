"""`dsv3 plan`: compile the real train step or serve steps for a TPU topology, ahead of time on
any machine (libtpu, no TPU needed), and report the compiler's memory verdict per device.

    report = plan(PlanRequest(topology="v5p:4x4x16", mode="train", config=DEEPSEEK_V3,
                              mesh={"fsdp": 16, "expert": 16}))

What is compiled (never a copy of it):
- train: `dsv3_jax.train.trainer.train_step_fn` (forward with MTP, loss, gradients, clip + AdamW,
  router-bias update), state donated; parameters and Adam moments abstract (nothing allocated),
  sharded by `ShardingRules`; float32 parameters and moments by default.
- serve: the serving engine's own programs (`dsv3_jax.serving.steps`, jitted by `steps.jit_step`
  as `Engine` jits them, with its shardings: `steps.serving_rules` unless --rules, the page pool
  split over the batch shards as `Engine` would split it): the prefill-chunk step
  (`forward_step`: decode_batch rows x prefill_chunk prompt tokens into the paged latent cache)
  and the decode step (`decode_steps`: decode_steps tokens per row in one call), at the largest
  bucket the engine would compile for max batch = decode_batch, max context = context
  (block tables covering it) and a pool of num_pages pages of page_size rows (default: every
  row at full context); pools donated; bfloat16 parameters, without the MTP blocks (plain
  decoding). Both are compiled and reported; the top-level figures are those of the step with
  the larger footprint.

Figures are per device. `total = argument + output - alias + temp` (XLA's accounting);
`peak` is XLA's own peak where this jax exposes it (`peak_memory_in_bytes`), else `total`. A
program that does not fit is rejected by the compiler with RESOURCE_EXHAUSTED: `fits` is that
verdict, and the figures then come from the compiler's message. `compiled_flops` /
`compiled_bytes` count each loop body x its trip count (`dsv3_jax.hlo_cost`; XLA's
`cost_analysis()`, which visits a loop body once, is kept as `xla_flops` / `xla_bytes`); a loop
with no readable trip count (`loops_unknown`) or unreadable HLO (`cost_error`) nulls the ratios.

The command line is `dsv3_jax.plan_cli` (`dsv3 plan`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv3_jax.config import ModelConfig, RuntimeConfig
from dsv3_jax.hlo_cost import HloCost, hlo_cost
from dsv3_jax.plan_hlo import (COLLECTIVES, GiB, HBM_GIB, HOT_PATHS, TOPOLOGY_FORMS, PlanError,
                              count_collectives, count_kernels, first_line, get_topology,
                              hbm_bytes_per_device, oom_figures)
from dsv3_jax.pretrained import abstract_model
from dsv3_jax.sharding import (EXPERT, compile_options_for, TENSOR, POD_RULES, SERVE_POD_RULES, ShardingRules,
                               rules_for_mesh, activation_sharding, use_rules,
                               wide_expert,
                               make_mesh, state_shardings)

__all__ = ["PlanRequest", "PlanReport", "StepReport", "PlanError", "plan", "get_topology",
           "hbm_bytes_per_device", "default_mesh", "parse_rules", "count_collectives",
           "count_kernels", "TOPOLOGY_FORMS", "HOT_PATHS", "COLLECTIVES", "HBM_GIB", "POD_RULES",
           "SERVE_POD_RULES"]

# The rules for a mesh without a tensor axis: `sharding.POD_RULES` (train) / `SERVE_POD_RULES`,
# the ones `Trainer` / `dsv3 train` / the serving engine place the model with (`rules_for_mesh`).
COST_COUNTING = ("compiled_flops/compiled_bytes: optimized HLO per device, " + HloCost.counting
                 + "; xla_flops/xla_bytes: XLA cost_analysis(), each loop body once")


@dataclasses.dataclass(frozen=True)
class PlanRequest:
  """What to compile.

  topology: libtpu topology name (`TOPOLOGY_FORMS`, e.g. "v5p:4x4x16"); mode: "train" | "serve";
  mesh: {axis: size} (None: `default_mesh`); rules: None picks `sharding.rules_for_mesh` (what
  `dsv3 train` places the model with: ShardingRules() with a tensor axis, else `POD_RULES`); a
  string is a `parse_rules` spec (e.g. "wide"), read against
  the mesh. train: batch_per_device x seq tokens per data shard, remat,
  param_dtype / opt_dtype (opt_dtype: the first Adam moment; the second follows param_dtype).
  serve: decode_batch sequences (the engine's max batch), context cache rows per sequence (its
  max context), page_size rows per page (128 by default: the TPU lanes; XLA:TPU lays a rope
  pool [L, pages, R, page] with fewer rows out page-major and copies it to row-major around
  each step), num_pages pool pages (None: decode_batch full
  contexts), prefill_chunk prompt tokens per row of a prefill step, decode_steps tokens per
  decode call (the engine's defaults); prompt_len is not used by serve (kept for the CLI).
  kernels: "pallas" (the TPU kernels) or "reference" (the jnp references).
  ep_capacity_factor: `RuntimeConfig.ep_capacity_factor` (expert parallelism's receive buffer per
  exchange round, x the average load; overflow goes in further rounds, nothing dropped).
  """

  topology: str
  mode: str
  config: ModelConfig
  mesh: Mapping[str, int] | None = None
  rules: ShardingRules | str | None = None
  batch_per_device: int = 1
  seq: int = 4096
  decode_batch: int = 64
  context: int = 8192
  prompt_len: int | None = None
  page_size: int = 128
  num_pages: int | None = None
  prefill_chunk: int = 64
  decode_steps: int = 4
  remat: str = "full"
  param_dtype: Any = None
  opt_dtype: Any = None
  kernels: str = "pallas"
  ep_capacity_factor: float = RuntimeConfig.ep_capacity_factor

  def __post_init__(self):
    if self.mode not in ("train", "serve"):
      raise PlanError(f"--mode must be 'train' or 'serve', got {self.mode!r}")
    if self.kernels not in ("pallas", "reference"):
      raise PlanError(f"--kernels must be 'pallas' or 'reference', got {self.kernels!r}")
    for name in ("batch_per_device", "seq", "decode_batch", "context", "page_size",
                 "prefill_chunk", "decode_steps") + (("num_pages",) if self.num_pages else ()):
      if getattr(self, name) < 1:
        raise PlanError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
    if not self.ep_capacity_factor > 0:
      raise PlanError(f"--ep-capacity-factor must be > 0, got {self.ep_capacity_factor}")
    if self.prompt_len is not None and not 1 <= self.prompt_len <= self.context:
      raise PlanError(f"--prompt-len {self.prompt_len} must be in [1, --context {self.context}]")


@dataclasses.dataclass
class StepReport:
  """One compiled program, per device. Byte/flop figures are None where the compiler gave none
  (e.g. temp_bytes when it rejected the program)."""

  name: str
  fits: bool
  compile_seconds: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int | None
  temp_bytes: int | None
  total_bytes: int
  peak_bytes: int
  compiled_flops: float | None
  compiled_bytes: float | None
  model_flops: float
  model_bytes: float
  collectives: dict[str, int]
  kernel_calls: dict[str, int]
  error: str | None = None
  # compiled_* count every loop body x its trip count (`dsv3_jax.hlo_cost`); xla_* are XLA's
  # cost_analysis() as it is (each loop body once); *_worst run every EP overflow round.
  xla_flops: float | None = None
  xla_bytes: float | None = None
  compiled_flops_worst: float | None = None
  compiled_bytes_worst: float | None = None
  loops: list | None = None       # [trip count (None: unknown), flops of one iteration]
  loops_unknown: int = 0          # loops whose trip count was not found (counted once)
  cost_error: str | None = None   # why compiled_flops/bytes are missing (HLO not understood)
  top_ops: dict | None = None     # {"flops"|"bytes": [[op_name, opcode, flops, bytes], ...]}
  # compile_seconds split: jax (trace + StableHLO) and XLA (HLO passes + TPU code generation),
  # wall and CPU seconds of this process (all threads); CPU seconds barely move with host load.
  compile_times: dict | None = None
  compile_options: dict | None = None  # the XLA options it was compiled with

  def ratios(self) -> tuple[float | None, float | None]:
    """compiled / model flops and bytes; None where a figure is missing or a loop's trip count
    is unknown (the compiled figure would undercount)."""
    return (None, None) if self.loops_unknown else (
        _ratio(self.compiled_flops, self.model_flops), _ratio(self.compiled_bytes, self.model_bytes))


@dataclasses.dataclass
class PlanReport:
  """The answer of `plan`: see the module docstring; `to_json()` is the CLI's --json object."""

  topology: str
  mode: str
  devices: int
  device_kind: str
  mesh: dict[str, int]
  rules: dict[str, Any]
  config: dict[str, Any]
  hbm_bytes: int
  parameter_bytes: int
  optimizer_bytes: int
  cache_bytes: int
  kernels: dict[str, str | None]
  steps: dict[str, StepReport]
  main_step: str
  advice: list[str]
  jax_version: str = jax.__version__

  @property
  def fits(self) -> bool:
    return all(s.fits for s in self.steps.values())

  def to_json(self) -> dict[str, Any]:
    m = self.steps[self.main_step]
    out = {k: getattr(self, k) for k in ("topology", "mode", "devices", "device_kind", "mesh",
                                          "rules", "config", "hbm_bytes", "parameter_bytes",
                                          "optimizer_bytes", "cache_bytes")}
    for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "total_bytes",
              "peak_bytes", "compiled_flops", "compiled_bytes", "model_flops", "model_bytes",
              "collectives", "kernel_calls", "error", "loops_unknown", "cost_error"):
      out[k] = getattr(m, k)
    out["peak_bytes"] = max(s.peak_bytes for s in self.steps.values())
    out["fits"] = self.fits
    out["compile_seconds"] = round(sum(s.compile_seconds for s in self.steps.values()), 2)
    laps = [lap for s in self.steps.values() for lap in (s.compile_times or {}).values()]
    out["compile_cpu_seconds"] = round(sum(lap["cpu"] for lap in laps), 2)
    out["flops_ratio"], out["bytes_ratio"] = m.ratios()
    out["xla_flops"], out["xla_bytes"] = m.xla_flops, m.xla_bytes
    out["cost_counting"] = COST_COUNTING
    out["compile_options"] = m.compile_options  # the main step's
    out.update(kernels=self.kernels, main_step=self.main_step, advice=self.advice,
               jax_version=self.jax_version,
               steps={k: {**dataclasses.asdict(s),
                          **dict(zip(("flops_ratio", "bytes_ratio"), s.ratios()))}
                      for k, s in self.steps.items()})
    return out


def _ratio(a, b):
  return None if a is None or not b else round(a / b, 4)


# Mesh and rules --------------------------------------------------------------------------------
def default_mesh(n_devices: int, cfg: ModelConfig) -> dict[str, int]:
  """Every device used: as many expert shards as divide both the device count and the routed
  expert count, the rest FSDP."""
  expert = math.gcd(n_devices, cfg.n_routed_experts) if cfg.n_routed_experts else 1
  return {"fsdp": n_devices // expert, "expert": expert}


def _build_mesh(sizes: Mapping[str, int], devices) -> Mesh:
  try:
    return make_mesh(dict(sizes), devices=devices)
  except ValueError as e:
    raise PlanError(f"--mesh {_fmt_mesh(sizes)}: {e}") from None
  except Exception:  # noqa: BLE001  jax's topology-aware placement can fail on some shapes
    return Mesh(np.asarray(devices).reshape(tuple(sizes.values())), tuple(sizes))


def _fmt_mesh(sizes) -> str:
  return ",".join(f"{k}={v}" for k, v in sizes.items())


def parse_rules(spec: str | None, mesh_sizes: Mapping[str, int]) -> ShardingRules:
  """"default" | "pod" | "wide" | "name=axis[+axis],..." (over the defaults) | None (pick by
  mesh). "wide": the rules None picks, with the routed experts spread whole over every non-tensor
  mesh axis (`sharding.wide_expert`: one expert per device when there are as many)."""
  if spec is None:
    return rules_for_mesh(mesh_sizes)
  if spec in ("default", "pod"):
    return ShardingRules() if spec == "default" else POD_RULES
  if spec == "wide":
    return wide_expert(parse_rules(None, mesh_sizes), mesh_sizes)
  kw = {}
  for part in filter(None, spec.split(",")):
    name, sep, axes = part.partition("=")
    if not sep:
      raise PlanError(f"--rules {spec!r}: expected name=axis entries, got {part!r}")
    ax = tuple(a for a in axes.split("+") if a and a != "none")
    kw[name.strip()] = None if not ax else ax[0] if len(ax) == 1 else ax
  try:
    return ShardingRules(**kw)
  except (TypeError, ValueError) as e:
    raise PlanError(f"--rules {spec!r}: {e}") from None


# Per-device sizes and model figures --------------------------------------------------------------
def _shard_bytes(tree) -> int:
  """Bytes per device of ShapeDtypeStruct leaves (a leaf without a sharding counts whole)."""
  def one(x):
    sh = getattr(x, "sharding", None)
    shape = sh.shard_shape(x.shape) if hasattr(sh, "shard_shape") else x.shape
    return math.prod(shape) * np.dtype(x.dtype).itemsize
  return sum(one(x) for x in jax.tree.leaves(tree))


def _sds(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def _param_leaves(params) -> list[tuple[str, tuple[str | None, ...], Any]]:
  """(path, logical axes, ShapeDtypeStruct) per nnx.Param."""
  out = []
  for path, v in nnx.to_flat_state(params):
    out.append((".".join(str(p) for p in path), tuple(v.get_metadata().get("axes") or ()),
                v.get_value()))
  return out


def _serve_model_figures(cfg: ModelConfig, params, batch: int, tokens: int, context: float,
                         cache_bytes_total: int, absorbed: bool):
  """(flops, bytes) of one serve step over all devices: weights a step touches (routed
  experts: the expected distinct share E(1-(1-k/E)^(B*T)) of each layer; MTP blocks are not run;
  embedding: the looked-up rows; norm scales whole) read once, 2 flops per matmul weight per
  token (per activated expert),
  plus attention over `context` rows per token and layer: 2*H*(2C+R) flops per row absorbed
  (decode), 2*H*(d_qk+d_v) per row otherwise (prefill); and `cache_bytes_total` once."""
  E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
  touched = 1.0 - (1.0 - k / E) ** (batch * tokens) if E else 1.0
  flops = bytes_ = 0.0
  for path, axes, x in _param_leaves(params):
    if path.startswith("mtp"):
      continue
    n, isz = math.prod(x.shape), np.dtype(x.dtype).itemsize
    if "embed_tokens" in path:
      bytes_ += batch * tokens * x.shape[-1] * isz
      continue
    if len([a for a in axes if a != "layers"]) < 2:  # norm scales: read, not a matmul
      bytes_ += n * isz
      continue
    frac = (k / E) if "expert" in axes else 1.0
    flops += 2.0 * n * frac * batch * tokens
    bytes_ += n * (touched if "expert" in axes else 1.0) * isz
  H, C, R = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
  per_row = 2.0 * H * ((2 * C + R) if absorbed else (cfg.qk_head_dim + cfg.v_head_dim))
  flops += cfg.num_hidden_layers * batch * tokens * per_row * context
  return flops, bytes_ + cache_bytes_total


# Compilation -------------------------------------------------------------------------------------
def _compile(name, mesh, jitted, args, n_devices, model_flops, model_bytes) -> StepReport:
  """Lowers and compiles one step under `mesh` with the options a run would use
  (`sharding.compile_options_for`; the train step's include `TPU_TRAIN_COMPILE_OPTIONS`);
  RESOURCE_EXHAUSTED becomes fits=False with the compiler's figures. Other compile errors raise
  PlanError."""
  clock = _Clock()
  options = compile_options_for(mesh, train=name == "train")
  try:
    with jax.set_mesh(mesh):
      lowered = jitted.lower(*args)
      clock.lap("lower")
      compiled = lowered.compile(compiler_options=options or None)
      clock.lap("xla")
  except Exception as e:  # noqa: BLE001
    secs = clock.total()
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg:
      hint = (" (the Pallas kernels cannot yet run in this sharded model: retry with --kernels "
              "reference)" if "Mosaic kernels cannot be automatically partitioned" in msg
              or "manual_axis_type" in msg else "")
      raise PlanError(f"compiling the {name} step failed: {first_line(e)}{hint}") from e
    arg_bytes, out_bytes = _shard_bytes(args), _shard_bytes(lowered.out_info)
    required, _ = oom_figures(msg)
    total = required if required is not None else arg_bytes + out_bytes
    return StepReport(name, False, round(secs, 2), arg_bytes, out_bytes, None, None, total,
                      total, None, None, model_flops / n_devices, model_bytes / n_devices,
                      dict.fromkeys(COLLECTIVES, 0), dict.fromkeys(HOT_PATHS + ("other",), 0),
                      error=first_line(e), compile_times=clock.laps,
                      compile_options=options)
  secs = clock.total()
  ma = compiled.memory_analysis()
  total = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
           + ma.temp_size_in_bytes)
  peak = getattr(ma, "peak_memory_in_bytes", None) or total
  ca = compiled.cost_analysis()
  ca = (ca[0] if ca else {}) if isinstance(ca, (list, tuple)) else (ca or {})
  hlo = compiled.as_text()
  xf, xb = float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))
  cost_error = None
  try:
    cost = hlo_cost(hlo, top=8)
  except Exception as e:  # noqa: BLE001  an HLO form the reader does not know: no figures
    cost = HloCost(None, None, None, None, None, xf, xb, [], 0, [], [])
    cost_error = f"hlo_cost could not read the optimized HLO: {first_line(e)}"
  top = {k: [[r[1], r[0], r[2], r[3]] for r in rows]
         for k, rows in (("flops", cost.top_flops), ("bytes", cost.top_bytes))}
  return StepReport(name, True, round(secs, 2), int(ma.argument_size_in_bytes),
                    int(ma.output_size_in_bytes), int(ma.alias_size_in_bytes),
                    int(ma.temp_size_in_bytes), int(total), int(peak), cost.flops, cost.bytes,
                    model_flops / n_devices, model_bytes / n_devices, count_collectives(hlo),
                    count_kernels(hlo), xla_flops=xf, xla_bytes=xb,
                    compiled_flops_worst=cost.flops_worst, compiled_bytes_worst=cost.bytes_worst,
                    loops=[[n, f] for _, n, f in cost.loops], top_ops=top,
                    loops_unknown=cost.unknown_loops, cost_error=cost_error,
                    compile_times=clock.laps, compile_options=options)


class _Clock:
  """Wall and process-CPU seconds per lap: laps = {name: {"wall": s, "cpu": s}}."""

  def __init__(self):
    self.laps, self._t0 = {}, (time.perf_counter(), time.process_time())
    self._last = self._t0

  def lap(self, name: str) -> None:
    now = (time.perf_counter(), time.process_time())
    self.laps[name] = {"wall": round(now[0] - self._last[0], 2),
                       "cpu": round(now[1] - self._last[1], 2)}
    self._last = now

  def total(self) -> float:
    return time.perf_counter() - self._t0[0]


def _runtime(req: PlanRequest) -> RuntimeConfig:
  train = req.mode == "train"
  pdt = req.param_dtype or (jnp.float32 if train else jnp.bfloat16)
  return RuntimeConfig(param_dtype=pdt, dtype=jnp.bfloat16, remat=req.remat if train else "none",
                       attention_backend=req.kernels, moe_backend=req.kernels,
                       linear_backend=req.kernels, kernel_platform="tpu",
                       ep_capacity_factor=req.ep_capacity_factor)


def plan(req: PlanRequest) -> PlanReport:
  """Compiles `req` for its topology and returns the per-device report (see module docstring).
  Raises PlanError for requests that cannot be compiled; a program that does not fit is a
  report with fits=False, not an error."""
  topo = get_topology(req.topology)
  devices = list(topo.devices)
  cfg = req.config
  if req.mode == "serve":  # plain (non-speculative) serving does not hold the MTP blocks
    cfg = cfg.replace(num_nextn_predict_layers=0)
  sizes = dict(req.mesh) if req.mesh else default_mesh(len(devices), cfg)
  if math.prod(sizes.values()) != len(devices) and -1 not in sizes.values():
    raise PlanError(f"--mesh {_fmt_mesh(sizes)} has {math.prod(sizes.values())} devices but "
                    f"topology {req.topology} has {len(devices)} ({devices[0].device_kind}); "
                    f"the axis sizes must multiply to {len(devices)}")
  mesh = _build_mesh(sizes, devices)
  sizes = dict(zip(mesh.axis_names, map(int, mesh.axis_sizes)))
  rules = parse_rules(req.rules if isinstance(req.rules, str) else None, sizes)
  rules = rules if req.rules is None or isinstance(req.rules, str) else req.rules
  E = cfg.n_routed_experts
  ep = math.prod(sizes.get(a, 1) for a in rules.mesh_axes("expert"))
  if E and ep > 1 and E % ep:
    raise PlanError(f"--mesh {_fmt_mesh(sizes)}: {E} routed experts do not split over the "
                    f"{ep} expert shards of the rules' expert={rules.expert!r}")
  if req.rules is None and req.mode == "serve":
    from dsv3_jax.serving.steps import serving_rules  # the engine's (`dsv3 serve`'s) rules
    rules = serving_rules(mesh)
  rt = _runtime(req)
  model = abstract_model(cfg, rt)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params_a = _sds(params, state_shardings(params, rules, mesh))
  rest_a = _sds(rest, state_shardings(rest, rules, mesh))
  rep = NamedSharding(mesh, P())
  data_shards = math.prod(sizes.get(a, 1) for a in rules.mesh_axes("batch"))
  build = _train_steps if req.mode == "train" else _serve_steps
  with use_rules(rules):  # the model's explicit collectives assume the parameters' rules
    steps, opt_bytes, cache_bytes = build(req, cfg, mesh, rules, graphdef, params, params_a,
                                          rest_a, rep, data_shards, len(devices))
  serve_geometry = steps.pop("geometry", {})
  hbm = hbm_bytes_per_device(devices[0])
  main = max(steps, key=lambda k: steps[k].peak_bytes)
  report = PlanReport(
      topology=req.topology, mode=req.mode, devices=len(devices),
      device_kind=devices[0].device_kind, mesh=sizes,
      rules={f.name: getattr(rules, f.name) for f in dataclasses.fields(rules)},
      config={"num_hidden_layers": cfg.num_hidden_layers,
              "first_k_dense_replace": cfg.first_k_dense_replace,
              "num_nextn_predict_layers": cfg.num_nextn_predict_layers,
              "hidden_size": cfg.hidden_size, "n_routed_experts": cfg.n_routed_experts,
              "param_dtype": np.dtype(rt.param_dtype).name, "remat": rt.remat,
              **({"batch_per_device": req.batch_per_device, "seq": req.seq,
                  "global_batch": req.batch_per_device * data_shards} if req.mode == "train" else
                 {"decode_batch": req.decode_batch, "context": req.context,
                  **serve_geometry})},
      hbm_bytes=hbm, parameter_bytes=_shard_bytes(params_a), optimizer_bytes=opt_bytes,
      cache_bytes=cache_bytes, kernels=_kernel_map(req, cfg, steps), steps=steps,
      main_step=main, advice=[])
  report.advice = advice(report, req)
  return report


def _kernel_map(req, cfg, steps) -> dict[str, str | None]:
  """hot path -> "pallas" | "reference" (in the compiled program), None (not part of it). For a
  step the compiler rejected (out of memory) there is no program to inspect: the request."""
  def state(path, names):
    if not all(steps[n].fits for n in names):
      return "pallas" if req.kernels == "pallas" else "reference"  # not compiled: as requested
    return "pallas" if all(steps[n].kernel_calls[path] > 0 for n in names) else "reference"
  blocks = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if req.mode == "train" else 0)
  moe = any(cfg.is_moe_layer(i) for i in range(blocks))
  if req.mode == "train":
    out = {"attention": state("attention", ["train"]), "decode": None}
    out["moe"] = state("moe", ["train"]) if moe else None
  else:
    # The engine's prefill chunks also attend over the (paged) cache: the decode kernel.
    out = {"attention": None, "decode": state("decode", ["prefill", "decode"])}
    out["moe"] = state("moe", ["prefill", "decode"]) if moe else None
  out["fp8"] = None  # plan compiles dense (bf16/fp32) weights: no FP8 matmul in the program
  return out


def _train_steps(req, cfg, mesh, rules, graphdef, params, params_a, rest_a, rep, data_shards, n):
  from dsv3_jax.train.loss import LossConfig
  from dsv3_jax.train.optim import OptimConfig, make_optimizer
  from dsv3_jax.train.trainer import train_flops_per_token, train_step_fn
  optim = OptimConfig(mu_dtype=None if req.opt_dtype is None else np.dtype(req.opt_dtype).name)
  opt_abs = jax.eval_shape(make_optimizer(optim).init, params)
  # Moments are sharded like their parameters; counts and other scalars are replicated.
  p_sh = jax.tree.map(lambda x: x.sharding, params_a)
  opt_sh = _opt_shardings(optim, opt_abs, p_sh, rep)
  opt_a = _sds(opt_abs, opt_sh)
  # The state layout of `Trainer.state`.
  state = {"params": params_a, "rest": rest_a, "opt": opt_a,
           "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  gb = req.batch_per_device * data_shards
  tok_sh = activation_sharding(("batch", "sequence"), rules, mesh, (gb, req.seq))
  tok = jax.ShapeDtypeStruct((gb, req.seq), jnp.int32, sharding=tok_sh)
  f32 = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  step = functools.partial(train_step_fn, graphdef, loss_cfg=LossConfig(), document_mask=False,
                           optim_cfg=optim)
  jitted = jax.jit(step, in_shardings=(state_sh, tok_sh, tok_sh, tok_sh, rep, rep),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
  args = (state, tok, tok, tok, f32, f32)
  flops = train_flops_per_token(cfg, req.seq) * gb * req.seq
  # The least a step must move: read and write the parameters and the optimizer state once.
  opt_bytes = _shard_bytes(opt_a)
  model_bytes = 2.0 * (_shard_bytes(params_a) + opt_bytes) * n
  return ({"train": _compile("train", mesh, jitted, args, n, flops, model_bytes)},
          opt_bytes, 0)


def _opt_shardings(optim, opt_abs, param_shardings, rep):
  """Shardings of the optax state: parameter-shaped parts take the parameters' shardings."""
  import optax
  from dsv3_jax.train.optim import make_optimizer
  return optax.tree_map_params(make_optimizer(optim), lambda _, s: s, opt_abs, param_shardings,
                               transform_non_params=lambda _: rep,
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def _serve_steps(req, cfg, mesh, rules, graphdef, params, params_a, rest_a, rep, data_shards, n):
  """The engine's prefill-chunk and decode programs (see the module docstring)."""
  from dsv3_jax.inference import absorb_weights
  from dsv3_jax.serving import steps
  from dsv3_jax.sharding import logical_to_spec, tree_shardings
  B, S, page, T = req.decode_batch, req.context, req.page_size, req.prefill_chunk
  pages_per_seq = -(-S // page)
  num_pages = req.num_pages or B * pages_per_seq
  # As `Engine` builds them: its state split, `Generator`'s shardings, its pool layout and
  # largest buckets (rows: shards x the largest row bucket; tables: a full context).
  full_graphdef, state = nnx.split(nnx.merge(graphdef, params, rest_a))
  state_sh = tree_shardings(state, rules, mesh)
  state_a = _sds(state, state_sh)
  absorbed = jax.eval_shape(lambda st: absorb_weights(nnx.merge(full_graphdef, st)), state_a)
  absorbed_sh = jax.tree.map(lambda x: NamedSharding(mesh, logical_to_spec(
      (None,) * (x.ndim - 3) + ("heads", None, None), rules, mesh, x.shape)), absorbed)
  absorbed_a = _sds(absorbed, absorbed_sh)
  buckets = []
  b = 1
  while b < B:
    buckets.append(b)
    b *= 2
  lay = steps.pool_layout(steps.batch_shards(mesh, rules), num_pages, B, pages_per_seq,
                          buckets + [B])
  rows = lay.shards * lay.row_buckets[-1]
  pool_sh = steps.pool_sharding(mesh, rules, lay.split)
  L, dt = cfg.num_hidden_layers, jnp.bfloat16
  latent = jax.ShapeDtypeStruct((L, lay.pool_pages, page, cfg.kv_lora_rank), dt, sharding=pool_sh)
  rope = jax.ShapeDtypeStruct((L, lay.pool_pages, cfg.qk_rope_head_dim, page), dt,
                              sharding=pool_sh)
  cache_bytes = _shard_bytes((latent, rope))
  programs = {}
  for kind, fn, statics in (("prefill", steps.forward_step, {}),
                            ("decode", steps.decode_steps, {"steps": req.decode_steps})):
    row_args = steps.abstract_rows(kind, rows, T, pages_per_seq, rep)
    jitted = steps.jit_step(fn, full_graphdef, state_sh, absorbed_sh, (pool_sh, pool_sh), rep,
                            len(row_args), pool_split=lay.split, **statics)
    programs[kind] = (jitted, (state_a, absorbed_a, latent, rope) + row_args)
  # Model figures: every row at a full context (the bucket's worst case); the cache rows the
  # step reads are B x S (not the pool's padding), once per token of a decode call.
  row_bytes = L * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * np.dtype(dt).itemsize
  ctx_bytes = B * S * row_bytes
  pf, pb = _serve_model_figures(cfg, params, B, T, S, ctx_bytes, absorbed=True)
  df, db = _serve_model_figures(cfg, params, B, 1, S, ctx_bytes, absorbed=True)
  k = req.decode_steps
  geometry = {"max_batch": B, "page_size": page, "num_pages": lay.shards * lay.shard_pages,
              "pool_split": lay.split, "pool_shards": lay.shards, "step_rows": rows,
              "pages_per_seq": pages_per_seq, "prefill_chunk": T, "decode_steps": k}
  return ({"prefill": _compile("prefill", mesh, *programs["prefill"], n, pf, pb),
           "decode": _compile("decode", mesh, *programs["decode"], n, k * df, k * db),
           "geometry": geometry}, 0, cache_bytes)


# Advice ------------------------------------------------------------------------------------------
def advice(report: PlanReport, req: PlanRequest) -> list[str]:
  """What to change when the plan does not fit (empty when it fits)."""
  if report.fits:
    return []
  hbm, out = report.hbm_bytes, []
  state = report.parameter_bytes + report.optimizer_bytes + report.cache_bytes
  if state > 0.9 * hbm:
    chips = math.ceil(report.devices * state / (0.6 * hbm))
    what = "parameters + optimizer state" if req.mode == "train" else "parameters + cache"
    out.append(f"the {what} alone need {state / GiB:.2f} GiB per device of {hbm / GiB:.2f}: "
               f"use a topology with about {chips}+ devices (or shard more of the state)")
  if req.mode == "train":
    if req.remat not in ("full", "offload"):
      out.append("--remat full (recompute each block in the backward pass)")
    if req.remat != "offload":
      out.append("--remat offload (full remat, and the saved layer inputs kept in host memory)")
    if req.kernels == "reference":
      out.append("--kernels pallas (the reference attention keeps [heads, T, T] float32 "
                 "probabilities)")
    if req.opt_dtype is None or np.dtype(req.opt_dtype) == np.float32:
      out.append("--opt-dtype bfloat16 (first Adam moment in bf16)")
    if req.param_dtype is None or np.dtype(req.param_dtype) == np.float32:
      out.append("--param-dtype bfloat16 (bf16 parameters and second moment)")
    n_experts = report.config["n_routed_experts"]
    axes = report.rules.get("expert") or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    shards = math.prod(report.mesh.get(a, 1) for a in axes)
    spread = math.prod(v for k, v in report.mesh.items() if k != TENSOR)
    if n_experts and shards < spread and n_experts % spread == 0:
      out.append(f"--rules wide (the {n_experts} routed experts whole over all {spread} "
                 f"non-tensor devices: no gathers of expert weights, no reductions of their "
                 f"gradients)")
    if report.mesh.get(EXPERT, 1) < max(n_experts, 1):
      out.append("a mesh with more expert shards (--mesh fsdp=..,expert=..) to split the routed "
                 "experts further")
    out.append("a smaller --batch-per-device or --seq")
  else:
    out.append("a smaller --decode-batch or --context (the cache grows with both), or a shorter "
               "--prompt-len for the prefill")
    out.append("more devices on the batch axes (the cache is split over the batch)")
    if req.kernels == "reference":
      out.append("--kernels pallas (no [heads, T, T] probabilities in the prefill)")
  return out
