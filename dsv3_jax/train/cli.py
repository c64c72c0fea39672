"""`dsv3 train [--config FILE|preset | --init CKPT] [--mesh fsdp=4,expert=2] [--steps --batch --seq --lr --out --data ...]`.

The run is sharded over `--mesh` (default: every device on fsdp; see `dsv3_jax.sharding`);
multi-host runs start with the --coordinator/--num-processes/--process-id flags (or their
DSV3_* environment variables; auto-detected on TPU pods), each process reading its own rows of
every batch. A model whose parameters + optimizer state do not fit the mesh's devices stops at
once with a one-line error.

Without --data the run uses the bundled synthetic corpus (byte-level tokens, see
`dsv3_jax.train.corpus`). --init starts from pretrained weights (an HF safetensors directory, a
`dsv3 convert` output, or another run): the model config is the checkpoint's. Resumes from the
latest checkpoint in --out when there is one. Writes config.json (so `dsv3 generate` /
`dsv3 export` take the run directory or a step), metrics.jsonl (each step once, also after an
interruption and resume) and a loss/expert-load plot (train_curves.png) to --out.
"""
from __future__ import annotations

import argparse
import json
import os

from dsv3_jax.errors import UserError

__all__ = ["add_arguments", "run", "load_model_config", "read_metrics", "write_plot",
           "bundled_token_file", "run_config", "trim_metrics"]


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default=None,
                 help="a preset name (`dsv3 configs` lists them) or a config.json / checkpoint dir "
                      "(default: tiny; with --init the checkpoint's; when resuming the run's)")
  p.add_argument("--init", default=None, metavar="CKPT",
                 help="fine-tune from these weights: an HF safetensors directory, a `dsv3 convert` "
                      "output, or a training run / step directory (the model config is the "
                      "checkpoint's; --config, if given, must agree)")
  p.add_argument("--data", nargs="*", default=None,
                 help="token files: .npy, .u32 (uint32) or .u16/.bin (uint16, vocab <= 65536); "
                      "`dsv3 tokenize` writes them; default: the bundled synthetic corpus")
  p.add_argument("--eos-id", type=int, default=0, help="end-of-document token id in --data")
  p.add_argument("--steps", type=int, default=200, help="total optimizer steps of the run")
  p.add_argument("--batch", type=int, default=8, help="global batch size (sequences per step)")
  p.add_argument("--seq", type=int, default=128,
                 help="sequence length (at most the config's max_position_embeddings)")
  p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
  p.add_argument("--warmup", type=int, default=None,
                 help="linear warm-up steps (default: steps/20, at least 1)")
  p.add_argument("--schedule", default="cosine", choices=("cosine", "constant_decay", "constant"),
                 help="learning-rate schedule after warm-up (constant_decay: DeepSeek-V3's shape)")
  p.add_argument("--allow-schedule-change", action="store_true",
                 help="resume although --steps/--lr/--warmup/--schedule differ from the run's "
                      "start (the schedule then changes mid-run)")
  p.add_argument("--out", default="runs/train",
                 help="output directory (checkpoints, metrics.jsonl, plot); an existing run there "
                      "is resumed")
  p.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
  p.add_argument("--keep", type=int, default=3, help="how many recent checkpoints to keep")
  p.add_argument("--mtp-lambda", type=float, default=0.3, help="weight of the MTP loss")
  p.add_argument("--balance-alpha", type=float, default=1e-4,
                 help="weight of the sequence-wise balance loss")
  p.add_argument("--bias-gamma", type=float, default=1e-3,
                 help="router-bias update speed of the aux-loss-free balancing (0 freezes it)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (master weights stay float32)")
  p.add_argument("--remat", default="none", choices=("none", "full", "dots"),
                 help="activation rematerialisation per decoder block")
  p.add_argument("--ep-capacity-factor", type=float, default=1.5,
                 help="expert-parallel receive buffer per exchange round, as a multiple of the "
                      "average load (tokens per shard x K; > 0); rows beyond it go in further "
                      "exchange rounds, none dropped")
  p.add_argument("--document-mask", action="store_true", help="attention stays within documents")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="accelerator peak for MFU (default: 790 on H100, else MFU not shown)")
  p.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")
  from dsv3_jax.sharding.entry import add_mesh_arguments
  add_mesh_arguments(p)
  p.add_argument("--wide-experts", action="store_true",
                 help="routed experts whole, spread over every non-tensor --mesh axis (one per "
                      "device when there are as many): never gathered, gradients never reduced")


def load_model_config(spec: str):
  """A preset name or a config.json path / checkpoint directory -> ModelConfig."""
  from dsv3_jax.config import PRESETS, ModelConfig
  if spec in PRESETS:
    return PRESETS[spec]
  if os.path.exists(spec):
    return ModelConfig.from_hf_config(spec)
  raise UserError(f"--config {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an "
                  f"existing file")


def _differing(a, b) -> list[str]:
  import dataclasses
  return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)
          and f.name != "quantization_config"]  # dequantised for training either way


def run_config(config: str | None, init: str | None, out: str):
  """The run's ModelConfig from --config / --init / the run directory's config.json.

  --init: the checkpoint's config (--config must agree: UserError naming the differing fields);
  else --config; with neither, the config of the run already in `out` (resuming) or tiny.
  Resuming with another config is refused by `check_resume` (run.json)."""
  from dsv3_jax.config import ModelConfig, PRESETS
  from dsv3_jax.pretrained import checkpoint_config
  requested = load_model_config(config) if config else None
  if init is not None:
    if not os.path.isdir(init):
      raise UserError(f"--init {init!r} is not a directory")
    cfg = checkpoint_config(init)
    if requested is not None and _differing(requested, cfg):
      raise UserError(f"--config {config} disagrees with the config of --init {init} in "
                      f"{', '.join(_differing(requested, cfg))} (leave --config out to use the "
                      f"checkpoint's)")
    return cfg
  if requested is not None:
    return requested
  saved = os.path.join(out, "config.json")
  return ModelConfig.from_hf_config(saved) if os.path.isfile(saved) else PRESETS["tiny"]


def _copy_tokenizer(out: str, init: str) -> None:
  """The tokenizer files of --init into the run directory (the Trainer writes config.json), so
  that `dsv3 generate --checkpoint RUN --prompt ...` finds them."""
  import shutil
  from dsv3_jax.checkpoint import TOKENIZER_FILES
  from dsv3_jax.param_tree import locate
  located = locate(init)
  src = located.config_dir if located is not None else os.path.abspath(init)
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, name)) and not os.path.exists(os.path.join(out, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(out, name))


def trim_metrics(path: str, step: int) -> None:
  """Keeps the rows of metrics.jsonl up to `step` (the step training continues from), one per
  step (the last written); rows of steps after the restored checkpoint, written before an
  interruption, are dropped, since those steps are trained again."""
  rows = {}
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue  # a line cut short by a kill
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
          rows[row["step"]] = line.rstrip("\n")
  with open(path + ".tmp", "w") as f:
    f.writelines(rows[k] + "\n" for k in sorted(rows))
  os.replace(path + ".tmp", path)


def bundled_token_file(out_dir: str) -> str:
  """Writes the bundled corpus as byte tokens (eos 0) to out_dir/corpus.bin; returns the path."""
  from dsv3_jax.train import corpus
  from dsv3_jax.train.data import write_tokens
  path = os.path.join(out_dir, "corpus.bin")
  if not os.path.exists(path):
    write_tokens(path, corpus.corpus_tokens(corpus.load_corpus(), eos_id=0))
  return path


def _peak_flops(arg: float | None) -> float | None:
  import jax
  if arg is not None:
    return arg * 1e12
  kind = jax.devices()[0].device_kind.lower()
  return 790e12 if "h100" in kind else None


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl, one per step in step order; a step logged twice (replayed after
  resuming from an earlier checkpoint) keeps its last row."""
  rows = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows[row["step"]] = row
  return [rows[k] for k in sorted(rows)]


def write_plot(history: list[dict], path: str) -> bool:
  """Loss curves and expert-load max/mean to a PNG at `path`.

  history: the trainer's per-step metrics (step, ce, mtp_ce, load_ratio). Returns False, writing
  nothing, when matplotlib (a dependency) cannot be imported.
  """
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  steps = [h["step"] for h in history]
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  a.plot(steps, [h["ce"] for h in history], label="next-token CE")
  a.plot(steps, [h["mtp_ce"] for h in history], label="MTP CE")
  a.set_xlabel("step"), a.set_ylabel("nats/token"), a.legend()
  b.plot(steps, [h["load_ratio"] for h in history])
  b.set_xlabel("step"), b.set_ylabel("expert load max/mean")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


RUN_FILE = "run.json"  # the model config and schedule a run started with (checked on resume)


def check_flags(args: argparse.Namespace) -> None:
  """UserError naming the first flag out of range (before anything is created)."""
  checks = [("--steps", args.steps, args.steps >= 1, ">= 1"),
            ("--batch", args.batch, args.batch >= 1, ">= 1"),
            ("--seq", args.seq, args.seq >= 2, ">= 2"),
            ("--lr", args.lr, args.lr > 0, "> 0"),
            ("--warmup", args.warmup, args.warmup is None or args.warmup >= 0, ">= 0"),
            ("--save-every", args.save_every, args.save_every >= 1, ">= 1"),
            ("--keep", args.keep, args.keep >= 1, ">= 1"),
            ("--mtp-lambda", args.mtp_lambda, args.mtp_lambda >= 0, ">= 0"),
            ("--balance-alpha", args.balance_alpha, args.balance_alpha >= 0, ">= 0"),
            ("--bias-gamma", args.bias_gamma, args.bias_gamma >= 0, ">= 0"),
            ("--ep-capacity-factor", args.ep_capacity_factor, args.ep_capacity_factor > 0, "> 0"),
            ("--peak-tflops", args.peak_tflops, args.peak_tflops is None or args.peak_tflops > 0,
             "> 0")]
  for flag, value, ok, want in checks:
    if not ok:
      raise UserError(f"{flag} must be {want}, got {value}")


def _run_record(cfg, optim) -> dict:
  config = cfg.to_hf_config()
  config.pop("quantization_config", None)  # an FP8 --init is dequantised: the run's weights are dense
  return {"config": config,
          "schedule": {"steps": optim.total_steps, "lr": optim.lr, "warmup": optim.warmup_steps,
                       "schedule": optim.schedule}}


def check_resume(out: str, record: dict, allow_schedule_change: bool) -> None:
  """When `out` holds a run started earlier, UserError if its model config differs (resuming would
  restore another model's tree), or its schedule does (unless allowed)."""
  path = os.path.join(out, RUN_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    try:
      old = json.load(f)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}: malformed JSON at line {e.lineno} ({e.msg})") from None
  diff = [k for k in sorted(set(old["config"]) | set(record["config"]))
          if old["config"].get(k) != record["config"].get(k)]
  if diff:
    k = diff[0]
    raise UserError(f"--config differs from the run in {out} ({k}: {old['config'].get(k)!r} there, "
                    f"{record['config'].get(k)!r} now{f', and {len(diff) - 1} more field(s)' if len(diff) > 1 else ''}); "
                    f"use another --out, or the --config the run started with")
  flags = {"steps": "--steps", "lr": "--lr", "warmup": "--warmup", "schedule": "--schedule"}
  changed = [f"{flags[k]} {old['schedule'][k]} -> {v}" for k, v in record["schedule"].items()
             if old["schedule"].get(k) != v]
  if changed and not allow_schedule_change:
    raise UserError(f"resuming the run in {out} with a different schedule ({', '.join(changed)}); "
                    f"pass the run's values, or --allow-schedule-change to change it mid-run")


def run(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp

  from dsv3_jax import ui
  from dsv3_jax.sharding import (activation_sharding, rules_for_mesh, cli_mesh, process_rows,
                                 wide_expert)
  from dsv3_jax.train.data import TokenDataset, check_token_files
  from dsv3_jax.train.loss import LossConfig
  from dsv3_jax.train.optim import OptimConfig, training_runtime
  from dsv3_jax.train.trainer import TrainConfig, Trainer
  from dsv3_jax.param_tree import latest_step

  # Everything a user can get wrong is checked before --out is created.
  check_flags(args)
  mesh = cli_mesh(args)  # before anything touches a device
  cfg = run_config(args.config, args.init, args.out)
  what = f"--init {args.init}" if args.init else f"--config {args.config or 'tiny'}"
  if args.seq > cfg.max_position_embeddings:
    raise UserError(f"--seq {args.seq} exceeds max_position_embeddings="
                    f"{cfg.max_position_embeddings} of {what}")
  if args.data:
    check_token_files(args.data, cfg.vocab_size)
    if not 0 <= args.eos_id < cfg.vocab_size:
      raise UserError(f"--eos-id {args.eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
  elif cfg.vocab_size < 256:
    raise UserError(f"the bundled corpus has byte tokens (256 ids) but {what} has "
                    f"vocab_size {cfg.vocab_size}; pass --data")
  warmup = args.warmup if args.warmup is not None else max(args.steps // 20, 1)
  optim = OptimConfig(lr=args.lr, warmup_steps=warmup, total_steps=args.steps,
                      schedule=args.schedule)
  record = _run_record(cfg, optim)
  check_resume(args.out, record, args.allow_schedule_change)
  rules = rules_for_mesh(mesh)  # what `dsv3 plan` compiles for this mesh
  if args.wide_experts:
    try:
      rules = wide_expert(rules, dict(mesh.shape), cfg.n_routed_experts)
    except ValueError as e:
      raise UserError(f"--wide-experts: {e}") from None
  # Each process reads the rows of the global batch its devices hold.
  shard, shards = process_rows(activation_sharding(("batch", "sequence"), rules, mesh,
                                                   (args.batch, args.seq)), (args.batch, args.seq))
  if args.data:  # opened (and its size checked against the batch) before --out exists
    data = TokenDataset(args.data, seq_len=args.seq, batch_size=args.batch, eos_id=args.eos_id,
                        seed=args.seed, vocab_size=cfg.vocab_size, shard_index=shard,
                        num_shards=shards)
  os.makedirs(args.out, exist_ok=True)
  if not args.data:
    data = TokenDataset(bundled_token_file(args.out), seq_len=args.seq, batch_size=args.batch,
                        eos_id=0, seed=args.seed, vocab_size=cfg.vocab_size, shard_index=shard,
                        num_shards=shards)
  train = TrainConfig(
      steps=args.steps, seed=args.seed, optim=optim,
      loss=LossConfig(mtp_lambda=args.mtp_lambda, balance_alpha=args.balance_alpha),
      bias_gamma=args.bias_gamma, document_mask=args.document_mask, save_every=args.save_every,
      keep=args.keep, peak_flops=_peak_flops(args.peak_tflops))
  rt = training_runtime(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32, args.remat,
                        ep_capacity_factor=args.ep_capacity_factor)
  main = jax.process_index() == 0
  init_model = None
  if args.init is not None and latest_step(os.path.join(args.out, "checkpoints")) is None:
    from dsv3_jax.pretrained import from_pretrained
    init_model = from_pretrained(args.init, runtime=rt, mesh=mesh, rules=rules)
    cfg = init_model.config
  if main and args.init is not None:
    _copy_tokenizer(args.out, args.init)
  say = print if main else (lambda *a, **k: None)  # every process trains; process 0 reports
  ckpt_dir = os.path.join(args.out, "checkpoints")
  args.on_interrupt = (f"nothing trained yet; checkpoints are in {ckpt_dir} (rerun the same "
                       f"command to resume)")
  trainer = Trainer(cfg, rt, train, data, out_dir=args.out, model=init_model, mesh=mesh,
                    rules=rules)
  del init_model
  fresh = trainer.checkpointer.latest_step() is None
  if main and fresh:  # a run's record is written when it starts (legacy runs have none)
    with open(os.path.join(args.out, RUN_FILE), "w") as f:
      json.dump(record, f, indent=1)
  mesh_str = ",".join(f"{n}={s}" for n, s in zip(mesh.axis_names, mesh.axis_sizes))
  say(f"mesh {mesh_str} ({jax.device_count()} {jax.devices()[0].platform} devices, "
      f"{jax.process_count()} process(es))")
  try:
    resumed = trainer.restore()
  except (ValueError, KeyError, TypeError) as e:
    if isinstance(e, UserError) or os.path.exists(os.path.join(args.out, RUN_FILE)):
      raise  # with a run record the config was checked above: anything else is a bug
    raise UserError(f"the checkpoints in {ckpt_dir} do not match {what} (a run without "
                    f"{RUN_FILE}, started with another config?); use another --out") from e
  if resumed:
    say(f"resumed from step {trainer.step} in {ckpt_dir}")
  elif args.init is not None:
    say(f"initialised from {args.init}")
  log_path = os.path.join(args.out, "metrics.jsonl")
  if main:  # rows of steps after the restored checkpoint are trained (and logged) again
    trim_metrics(log_path, trainer.step)
    ui.status("compiling the training step (the first step includes compilation) ...")
  bar = ui.progress(args.steps, "train", unit="step", initial=trainer.step, disable=not main)
  logged = trainer.step  # the last step whose metrics row is written
  try:
    with open(log_path if main else os.devnull, "a") as log:
      for m in trainer.run():
        row = {k: v for k, v in m.items() if k != "layer_load"}
        log.write(json.dumps(row) + "\n")
        log.flush()  # a killed run keeps every step it logged (resuming drops the unsaved ones)
        logged = m["step"]
        post = dict(loss=f"{m['loss']:.3f}", mtp=f"{m['mtp_ce']:.3f}", bal=f"{m['balance']:.3f}",
                    load=f"{m['load_ratio']:.2f}", tok_s=f"{m['tokens_per_s']:.0f}")
        if "mfu" in m:
          post["mfu"] = f"{100 * m['mfu']:.1f}%"
        bar.set_postfix(post)
        bar.update(1)
  except KeyboardInterrupt:
    bar.close()
    args.on_interrupt = _save_on_interrupt(trainer, logged, ckpt_dir)
    raise
  bar.close()
  trainer.close()
  if trainer.history:
    h0, h1 = trainer.history[0], trainer.history[-1]
    say(f"steps {h0['step']}..{h1['step']}: loss {h0['loss']:.3f} -> {h1['loss']:.3f}, "
        f"expert load max/mean {h0['load_ratio']:.2f} -> {h1['load_ratio']:.2f}")
  plot = os.path.join(args.out, "train_curves.png")
  if main and trainer.history and write_plot(read_metrics(log_path), plot):
    say(f"plot: {plot}")
  elif trainer.history:
    say("matplotlib could not be imported: no plot (metrics are in metrics.jsonl)")
  say(f"checkpoints: {ckpt_dir} (latest step {trainer.checkpointer.latest_step()})")
  return 0


def _save_on_interrupt(trainer, logged: int, ckpt_dir: str) -> str:
  """After Ctrl-C: saves the state when it is that of the last logged step (so metrics.jsonl and
  the checkpoint agree); returns the line telling the user what is on disk."""
  saved = None
  if trainer.step == logged and trainer.step > 0:
    try:
      trainer.save(force=True)
      saved = trainer.step
    except Exception:  # a second Ctrl-C or a full disk: report the last good checkpoint
      saved = None
  latest = trainer.checkpointer.latest_step()
  try:
    trainer.close()
  except Exception:
    pass
  where = (f"saved step {saved}" if saved is not None else
           f"latest checkpoint: step {latest}" if latest is not None else "no checkpoint yet")
  return f"at step {trainer.step}; {where} in {ckpt_dir}; rerun the same command to resume"
