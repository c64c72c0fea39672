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

__all__ = ["add_arguments", "run", "load_model_config", "read_metrics", "write_plot",
           "bundled_token_file"]


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default="tiny", help="a preset name (tiny, deepseek-v3) or a config.json")
  p.add_argument("--data", nargs="*", default=None,
                 help="token files (.bin uint16 or .npy); default: the bundled synthetic corpus")
  p.add_argument("--eos-id", type=int, default=0, help="end-of-document token id in --data")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps/20)")
  p.add_argument("--schedule", default="cosine", choices=("cosine", "constant_decay", "constant"))
  p.add_argument("--out", default="runs/train", help="output directory (checkpoints, metrics, plot)")
  p.add_argument("--save-every", type=int, default=100)
  p.add_argument("--keep", type=int, default=3)
  p.add_argument("--mtp-lambda", type=float, default=0.3)
  p.add_argument("--balance-alpha", type=float, default=1e-4)
  p.add_argument("--bias-gamma", type=float, default=1e-3)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype (master weights stay float32)")
  p.add_argument("--remat", default="none", choices=("none", "full", "dots"))
  p.add_argument("--document-mask", action="store_true", help="attention stays within documents")
  p.add_argument("--peak-tflops", type=float, default=None,
                 help="accelerator peak for MFU (default: 790 on H100, else MFU not shown)")
  p.add_argument("--seed", type=int, default=0)
  from dsv3_jax.sharding.entry import add_mesh_arguments
  add_mesh_arguments(p)


def load_model_config(spec: str):
  """A preset name or a config.json path / checkpoint directory -> ModelConfig."""
  from dsv3_jax.config import PRESETS, ModelConfig
  if spec in PRESETS:
    return PRESETS[spec]
  if os.path.exists(spec):
    return ModelConfig.from_hf_config(spec)
  raise ValueError(f"--config {spec!r} is neither a preset ({sorted(PRESETS)}) nor an existing file")


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


def _fail(msg: str) -> int:
  print(f"dsv3 train: error: {msg}", file=sys.stderr)
  return 2


def run(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp
  from tqdm import tqdm

  from dsv3_jax.sharding import (MemoryBudgetError, ShardingRules, activation_sharding,
                                 cli_mesh, process_rows)
  from dsv3_jax.train.data import TokenDataset
  from dsv3_jax.train.loss import LossConfig
  from dsv3_jax.train.optim import OptimConfig, training_runtime
  from dsv3_jax.train.trainer import TrainConfig, Trainer

  try:  # before anything touches a device
    mesh = cli_mesh(args)
  except ValueError as e:
    return _fail(str(e))
  try:
    cfg = load_model_config(args.config)
  except (ValueError, FileNotFoundError) as e:
    return _fail(str(e))
  rules = ShardingRules()
  os.makedirs(args.out, exist_ok=True)
  paths = args.data or [bundled_token_file(args.out)]
  eos = 0 if not args.data else args.eos_id
  try:
    if args.batch < 1 or args.seq < 2:
      raise ValueError(f"need --batch >= 1 and --seq >= 2, got {args.batch}, {args.seq}")
    # Each process reads the rows of the global batch its devices hold.
    shard, shards = process_rows(activation_sharding(("batch", "sequence"), rules, mesh,
                                                     (args.batch, args.seq)), (args.batch, args.seq))
    data = TokenDataset(paths, seq_len=args.seq, batch_size=args.batch, eos_id=eos, seed=args.seed,
                        vocab_size=cfg.vocab_size, shard_index=shard, num_shards=shards)
  except (ValueError, FileNotFoundError) as e:
    return _fail(str(e))
  warmup = args.warmup if args.warmup is not None else max(args.steps // 20, 1)
  train = TrainConfig(
      steps=args.steps, seed=args.seed,
      optim=OptimConfig(lr=args.lr, warmup_steps=warmup, total_steps=args.steps, schedule=args.schedule),
      loss=LossConfig(mtp_lambda=args.mtp_lambda, balance_alpha=args.balance_alpha),
      bias_gamma=args.bias_gamma, document_mask=args.document_mask, save_every=args.save_every,
      keep=args.keep, peak_flops=_peak_flops(args.peak_tflops))
  rt = training_runtime(jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32, args.remat)
  try:
    trainer = Trainer(cfg, rt, train, data, out_dir=args.out, mesh=mesh, rules=rules)
  except MemoryBudgetError as e:
    return _fail(str(e))
  main = jax.process_index() == 0
  say = print if main else (lambda *a, **k: None)  # every process trains; process 0 reports
  mesh_str = ",".join(f"{n}={s}" for n, s in zip(mesh.axis_names, mesh.axis_sizes))
  say(f"mesh {mesh_str} ({jax.device_count()} {jax.devices()[0].platform} devices, "
      f"{jax.process_count()} process(es))")
  if trainer.restore():
    say(f"resumed from step {trainer.step} in {args.out}/checkpoints")
  log_path = os.path.join(args.out, "metrics.jsonl")
  bar = tqdm(total=args.steps, initial=trainer.step, desc="train", unit="step", disable=not main)
  with open(log_path if main else os.devnull, "a") as log:
    for m in trainer.run():
      row = {k: v for k, v in m.items() if k != "layer_load"}
      log.write(json.dumps(row) + "\n")
      post = dict(loss=f"{m['loss']:.3f}", mtp=f"{m['mtp_ce']:.3f}", bal=f"{m['balance']:.3f}",
                  load=f"{m['load_ratio']:.2f}", tok_s=f"{m['tokens_per_s']:.0f}")
      if "mfu" in m:
        post["mfu"] = f"{100 * m['mfu']:.1f}%"
      bar.set_postfix(post)
      bar.update(1)
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
  say(f"checkpoints: {args.out}/checkpoints (latest step {trainer.checkpointer.latest_step()})")
  return 0
