"""`dsv3 plan --topology v5p:4x4x16 --mode train|serve --config deepseek-v3 [--mesh ...] [--json]`.

Compiles the real train step (or the prefill and decode steps) for a TPU topology on this
machine (libtpu, no TPU needed; `pip install "jax[tpu]==<jax version>"`) and prints per device
the parameters, optimizer state, cache, the compiler's temporaries and total against the chip's
HBM, whether it fits (the compiler's verdict), compile seconds, collectives by kind, which hot
paths run as Pallas kernels, the compiler's flops / bytes next to the model's, and what to
change when it does not fit.

Exit status: 0 fits, 1 does not fit (the report says what to change), 2 error (bad topology,
mesh or flags, missing libtpu, a compile error other than running out of memory).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

__all__ = ["add_arguments", "run", "format_report"]

GiB = 1024 ** 3


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--topology", required=True,
                 help="libtpu topology: v5e:RxC, v5p:XxYxZ, v6e:RxC, tpu7x:XxYxZ, v4:XxYxZ "
                      "(chips per dimension, e.g. v5p:4x4x16 = 256 chips)")
  p.add_argument("--mode", choices=("train", "serve"), default="train")
  p.add_argument("--config", default="deepseek-v3",
                 help="a preset (tiny, deepseek-v3) or a config.json / checkpoint directory")
  p.add_argument("--mesh", default=None,
                 help="named axis sizes, e.g. fsdp=16,expert=16 (default: expert shards = "
                      "gcd(devices, routed experts), the rest fsdp)")
  p.add_argument("--rules", default=None,
                 help="sharding rules: 'default', 'pod' (dense head/FFN/vocab dims over expert, "
                      "attention low-rank dims over fsdp), "
                      "'wide' (pod, with the routed experts whole and spread over every "
                      "non-tensor mesh axis: one expert per device at 256 devices) "
                      "or name=axis[+axis],... over the defaults (default: pod unless the mesh "
                      "has a tensor axis)")
  p.add_argument("--layers", type=int, default=None,
                 help="override num_hidden_layers (quick runs); keeps at least one MoE layer")
  p.add_argument("--dense", type=int, default=None, help="override first_k_dense_replace")
  p.add_argument("--mtp", type=int, default=None, help="override num_nextn_predict_layers")
  g = p.add_argument_group("train")
  g.add_argument("--batch-per-device", type=int, default=1, help="sequences per data shard")
  g.add_argument("--seq", type=int, default=4096)
  g.add_argument("--remat", choices=("none", "full", "dots", "offload"), default="full")
  g.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                 help="parameter (and second Adam moment) dtype; default float32 to train, "
                      "bfloat16 to serve")
  g.add_argument("--opt-dtype", choices=("float32", "bfloat16"), default=None,
                 help="first Adam moment dtype (default: --param-dtype)")
  g = p.add_argument_group("serve")
  g.add_argument("--decode-batch", type=int, default=64, help="sequences decoded together")
  g.add_argument("--context", type=int, default=8192, help="cache rows per sequence")
  g.add_argument("--prompt-len", type=int, default=None,
                 help="unused: the engine prefills in --prefill-chunk pieces (kept for scripts)")
  g.add_argument("--page-size", type=int, default=128,
                 help="latent-cache rows per page (TPU: 128 keeps the rope pages lane-aligned)")
  g.add_argument("--num-pages", type=int, default=None,
                 help="pages in the pool (default: --decode-batch full --context sequences)")
  g.add_argument("--prefill-chunk", type=int, default=64,
                 help="prompt tokens per row of a prefill step (as serve)")
  g.add_argument("--decode-steps", type=int, default=4,
                 help="decode steps per device call (as serve)")
  p.add_argument("--ep-capacity-factor", type=float, default=1.5,
                 help="expert-parallel receive buffer per exchange round, as a multiple of the "
                      "average load (tokens per shard x K; > 0); rows beyond it go in further "
                      "exchange rounds, none dropped")
  p.add_argument("--kernels", choices=("pallas", "reference"), default="pallas",
                 help="attention / decode / MoE as TPU Pallas kernels or the jnp references")
  p.add_argument("--json", action="store_true", help="print one JSON object")


def _config(args):
  from dsv3_jax.plan import PlanError
  from dsv3_jax.train.cli import load_model_config
  try:
    cfg = load_model_config(args.config)
  except (ValueError, FileNotFoundError) as e:
    raise PlanError(str(e)) from None
  kw = {}
  if args.layers is not None:
    if args.layers < 1:
      raise PlanError(f"--layers must be >= 1, got {args.layers}")
    kw["num_hidden_layers"] = args.layers
    if cfg.n_routed_experts and cfg.first_k_dense_replace >= args.layers:
      kw["first_k_dense_replace"] = args.layers - 1
  if args.dense is not None:
    kw["first_k_dense_replace"] = args.dense
  if args.mtp is not None:
    kw["num_nextn_predict_layers"] = args.mtp
  try:
    return cfg.replace(**kw) if kw else cfg
  except ValueError as e:
    raise PlanError(str(e)) from None


def run(args: argparse.Namespace) -> int:
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from dsv3_jax.plan import PlanError, PlanRequest, parse_rules, plan
  from dsv3_jax.sharding import parse_mesh_shape
  # Only the flags are turned into PlanError here; `plan` raises PlanError (a UserError, printed
  # in one line by the `dsv3` handler) for what the user can fix, and anything else is a bug that
  # keeps its traceback.
  try:
    mesh = parse_mesh_shape(args.mesh) if args.mesh else None
    # a spec is read against the mesh `plan` builds ("wide" depends on it); checked here first
    rules = None if args.rules is None else args.rules
    if rules is not None:
      parse_rules(rules, mesh or {})
  except ValueError as e:
    raise PlanError(str(e)) from None
  req = PlanRequest(
      topology=args.topology, mode=args.mode, config=_config(args), mesh=mesh, rules=rules,
      batch_per_device=args.batch_per_device, seq=args.seq, decode_batch=args.decode_batch,
      context=args.context, prompt_len=args.prompt_len, page_size=args.page_size,
      num_pages=args.num_pages, prefill_chunk=args.prefill_chunk, decode_steps=args.decode_steps,
      remat=args.remat,
      param_dtype=args.param_dtype, opt_dtype=args.opt_dtype, kernels=args.kernels,
      ep_capacity_factor=args.ep_capacity_factor)
  report = plan(req)
  if args.json:
    for name, s in report.steps.items():
      if s.loops_unknown or s.cost_error:
        print(f"dsv3 plan: warning: {name} step: {cost_warning(s)}", file=sys.stderr)
    print(json.dumps(report.to_json(), default=str))
  else:
    print(format_report(report))
  return 0 if report.fits else 1


def cost_warning(s) -> str:
  """Why a step's compiled flops/bytes ratios are withheld (`StepReport.ratios`)."""
  return s.cost_error or (f"{s.loops_unknown} loop(s) with no readable trip count, counted "
                          f"once: compiled flops/bytes undercount; ratios withheld")


def _gib(b) -> str:
  return "-" if b is None else f"{b / GiB:,.2f} GiB"


def format_report(report) -> str:
  """Human-readable text of a PlanReport."""
  j = report.to_json()
  mesh = ",".join(f"{k}={v}" for k, v in j["mesh"].items())
  lines = [f"dsv3 plan: {j['mode']} on {j['topology']} ({j['devices']} x {j['device_kind']}, "
           f"{_gib(j['hbm_bytes'])} HBM each), mesh {mesh}", "",
           "per device:",
           f"  parameters        {_gib(j['parameter_bytes'])}",
           f"  optimizer state   {_gib(j['optimizer_bytes'])}",
           f"  cache             {_gib(j['cache_bytes'])}"]
  for name, s in report.steps.items():
    verdict = "fits" if s.fits else "DOES NOT FIT"
    lines += ["", f"{name} step ({verdict}, compiled in {s.compile_seconds:.1f} s):",
              f"  arguments {_gib(s.argument_bytes)}  outputs {_gib(s.output_bytes)}  "
              f"aliased {_gib(s.alias_bytes)}  temporaries {_gib(s.temp_bytes)}",
              f"  total {_gib(s.total_bytes)}  peak {_gib(s.peak_bytes)}  of {_gib(j['hbm_bytes'])}"]
    if s.error:
      lines.append(f"  compiler: {s.error}")
    else:
      lines.append("  collectives: " + ", ".join(f"{k} {v}" for k, v in s.collectives.items()))
      fr, br = ("-" if r is None else f"{r:.2f}x" for r in s.ratios())
      lines.append(f"  flops: compiled {s.compiled_flops or 0:.3e}, model {s.model_flops:.3e} "
                   f"({fr}); bytes: compiled {s.compiled_bytes or 0:.3e}, model "
                   f"{s.model_bytes:.3e} ({br})")
      if s.loops_unknown or s.cost_error:
        lines.append(f"  WARNING: {cost_warning(s)}")
      trips = [n for n, _ in s.loops or []]
      lines.append(f"    (loops counted x trip count: {len(trips)} loops, trips "
                   f"{sorted(set(trips), key=lambda n: (n is None, n or 0))}; XLA's "
                   f"cost_analysis, each loop once: {s.xla_flops or 0:.3e} flops, "
                   f"{s.xla_bytes or 0:.3e} bytes)")
      for kind, col in (("flops", 2), ("bytes", 3)):
        total = (s.compiled_flops if kind == "flops" else s.compiled_bytes) or 0
        rows = [r for r in (s.top_ops or {}).get(kind, [])[:3] if r[col] and total]
        if rows:
          lines.append(f"    most {kind}: " + "; ".join(
              f"{r[1]} {'/'.join(r[0].split('/')[-2:])} {r[col] / total:.0%}" for r in rows))
  lines += ["", "kernels: " + ", ".join(f"{k} {v}" for k, v in j["kernels"].items()
                                        if v is not None),
            f"fits: {'yes' if j['fits'] else 'no'} (peak {_gib(j['peak_bytes'])} of "
            f"{_gib(j['hbm_bytes'])})"]
  if j["advice"]:
    lines += ["to make it fit, try:"] + [f"  - {a}" for a in j["advice"]]
  return "\n".join(lines)
