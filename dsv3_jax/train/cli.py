"""`dsv3 train --config FILE|preset [--mesh fsdp=4,expert=2] [--steps --batch --seq --lr --out --data ...]`.

The run is sharded over `--mesh` (default: every device on fsdp; see `dsv3_jax.sharding`);
multi-host runs start with the --coordinator/--num-processes/--process-id flags (or their
DSV3_* environment variables; auto-detected on TPU pods), each process reading its own rows of
every batch. A model whose parameters + optimizer state do not fit the mesh's devices stops at
once with a one-line error.

Without --data the run uses the bundled synthetic corpus (byte-level tokens, see
`dsv3_jax.train.corpus`). Resumes from the latest checkpoint in --out when there is one. Writes
metrics.jsonl and a loss/expert-load plot (train_curves.png) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from dsv3_jax.errors import UserError

__all__ = ["add_arguments", "run", "load_model_config", "read_metrics", "write_plot",
           "bundled_token_file"]


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default="tiny",
                 help="a preset name (`dsv3 configs` lists them) or a config.json / checkpoint dir")
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
  p.add_argument("--document-mask", action="store_true", help="attention stays within documents")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="accelerator peak for MFU (default: 790 on H100, else MFU not shown)")
  p.add_argument("--seed", type=int, default=0, help="initialisation and data-order seed")
  from dsv3_jax.sharding.entry import add_mesh_arguments
  add_mesh_arguments(p)


def load_model_config(spec: str):
  """A preset name or a config.json path / checkpoint directory -> ModelConfig."""
  from dsv3_jax.config import PRESETS, ModelConfig
  if spec in PRESETS:
    return PRESETS[spec]
  if os.path.exists(spec):
    return ModelConfig.from_hf_config(spec)
  raise UserError(f"--config {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an "
                  f"existing file")


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
            ("--peak-tflops", args.peak_tflops, args.peak_tflops is None or args.peak_tflops > 0,
             "> 0")]
  for flag, value, ok, want in checks:
    if not ok:
      raise UserError(f"{flag} must be {want}, got {value}")


def _run_record(cfg, optim) -> dict:
  return {"config": cfg.to_hf_config(),
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
  from dsv3_jax.sharding import ShardingRules, activation_sharding, cli_mesh, process_rows
  from dsv3_jax.train.data import TokenDataset, check_token_files
  from dsv3_jax.train.loss import LossConfig
  from dsv3_jax.train.optim import OptimConfig, training_runtime
  from dsv3_jax.train.trainer import TrainConfig, Trainer

  # Everything a user can get wrong is checked before --out is created.
  check_flags(args)
  mesh = cli_mesh(args)  # before anything touches a device
  cfg = load_model_config(args.config)
  if args.seq > cfg.max_position_embeddings:
    raise UserError(f"--seq {args.seq} exceeds max_position_embeddings="
                    f"{cfg.max_position_embeddings} of --config {args.config}")
  if args.data:
    check_token_files(args.data, cfg.vocab_size)
    if not 0 <= args.eos_id < cfg.vocab_size:
      raise UserError(f"--eos-id {args.eos_id} is outside the vocabulary [0, {cfg.vocab_size})")
  elif cfg.vocab_size < 256:
    raise UserError(f"the bundled corpus has byte tokens (256 ids) but --config {args.config} has "
                    f"vocab_size {cfg.vocab_size}; pass --data")
  warmup = args.warmup if args.warmup is not None else max(args.steps // 20, 1)
  optim = OptimConfig(lr=args.lr, warmup_steps=warmup, total_steps=args.steps,
                      schedule=args.schedule)
  record = _run_record(cfg, optim)
  check_resume(args.out, record, args.allow_schedule_change)
  rules = ShardingRules()
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
  rt = training_runtime(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32, args.remat)
  main = jax.process_index() == 0
  say = print if main else (lambda *a, **k: None)  # every process trains; process 0 reports
  ckpt_dir = os.path.join(args.out, "checkpoints")
  args.on_interrupt = (f"nothing trained yet; checkpoints are in {ckpt_dir} (rerun the same "
                       f"command to resume)")
  trainer = Trainer(cfg, rt, train, data, out_dir=args.out, mesh=mesh, rules=rules)
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
    raise UserError(f"the checkpoints in {ckpt_dir} do not match --config {args.config} (a run "
                    f"without {RUN_FILE}, started with another config?); use another --out") from e
  if resumed:
    say(f"resumed from step {trainer.step} in {ckpt_dir}")
  log_path = os.path.join(args.out, "metrics.jsonl")
  if main:
    ui.status("compiling the training step (the first step includes compilation) ...")
  bar = ui.progress(args.steps, "train", unit="step", initial=trainer.step, disable=not main)
  logged = trainer.step  # the last step whose metrics row is written
  try:
    with open(log_path if main else os.devnull, "a") as log:
      for m in trainer.run():
        row = {k: v for k, v in m.items() if k != "layer_load"}
        log.write(json.dumps(row) + "\n")
        log.flush()
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
