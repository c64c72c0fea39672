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
import sys

__all__ = ["add_arguments", "run", "load_model_config", "read_metrics", "write_plot",
           "bundled_token_file", "run_config", "trim_metrics"]


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--config", default=None,
                 help="a preset name (tiny, deepseek-v3) or a config.json (default: tiny; with "
                      "--init the checkpoint's; when resuming the run's)")
  p.add_argument("--init", default=None, metavar="CKPT",
                 help="fine-tune from these weights: an HF safetensors directory, a `dsv3 convert` "
                      "output, or a training run / step directory (the model config is the "
                      "checkpoint's; --config, if given, must agree)")
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


def _differing(a, b) -> list[str]:
  import dataclasses
  return [f.name for f in dataclasses.fields(a) if getattr(a, f.name) != getattr(b, f.name)
          and f.name != "quantization_config"]  # dequantised for training either way


def run_config(config: str | None, init: str | None, out: str):
  """The run's ModelConfig from --config / --init / the run directory's config.json.

  --init: the checkpoint's config (--config must agree); else --config (default tiny). A run
  directory that already holds a config.json (a resumed run) must agree too; with neither flag
  its config is taken. Raises UserError naming the flag and the differing fields."""
  from dsv3_jax.config import ModelConfig, PRESETS
  from dsv3_jax.errors import UserError
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
  else:
    cfg = requested
  saved = os.path.join(out, "config.json")
  if os.path.isfile(saved):
    run_cfg = ModelConfig.from_hf_config(saved)
    if cfg is None:
      return run_cfg
    if _differing(cfg, run_cfg):
      raise UserError(f"--out {out} holds a run of another model ({saved} differs in "
                      f"{', '.join(_differing(cfg, run_cfg))}); use a new --out, or the run's "
                      f"own config")
  return cfg if cfg is not None else PRESETS["tiny"]


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
  from dsv3_jax.errors import UserError
  from dsv3_jax.param_tree import latest_step
  try:
    cfg = run_config(args.config, args.init, args.out)
  except (UserError, ValueError, FileNotFoundError) as e:
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
  main = jax.process_index() == 0
  init_model = None
  if args.init is not None and latest_step(os.path.join(args.out, "checkpoints")) is None:
    from dsv3_jax.pretrained import from_pretrained
    init_model = from_pretrained(args.init, runtime=rt, mesh=mesh, rules=rules)
    cfg = init_model.config
  if main and args.init is not None:
    _copy_tokenizer(args.out, args.init)
  try:
    trainer = Trainer(cfg, rt, train, data, out_dir=args.out, model=init_model, mesh=mesh,
                      rules=rules)
  except MemoryBudgetError as e:
    return _fail(str(e))
  del init_model
  say = print if main else (lambda *a, **k: None)  # every process trains; process 0 reports
  mesh_str = ",".join(f"{n}={s}" for n, s in zip(mesh.axis_names, mesh.axis_sizes))
  say(f"mesh {mesh_str} ({jax.device_count()} {jax.devices()[0].platform} devices, "
      f"{jax.process_count()} process(es))")
  if trainer.restore():
    say(f"resumed from step {trainer.step} in {args.out}/checkpoints")
  elif args.init is not None:
    say(f"initialised from {args.init}")
  log_path = os.path.join(args.out, "metrics.jsonl")
  if main:
    trim_metrics(log_path, trainer.step)
  bar = tqdm(total=args.steps, initial=trainer.step, desc="train", unit="step", disable=not main)
  try:
    with open(log_path if main else os.devnull, "a") as log:
      for m in trainer.run():
        row = {k: v for k, v in m.items() if k != "layer_load"}
        log.write(json.dumps(row) + "\n")
        log.flush()  # a killed run keeps every step it logged (resuming drops the unsaved ones)
        post = dict(loss=f"{m['loss']:.3f}", mtp=f"{m['mtp_ce']:.3f}", bal=f"{m['balance']:.3f}",
                    load=f"{m['load_ratio']:.2f}", tok_s=f"{m['tokens_per_s']:.0f}")
        if "mfu" in m:
          post["mfu"] = f"{100 * m['mfu']:.1f}%"
        bar.set_postfix(post)
        bar.update(1)
  except KeyboardInterrupt:
    bar.close()
    last = trainer.checkpointer.latest_step()
    print(f"\ndsv3 train: interrupted at step {trainer.step}; the same command resumes from "
          f"step {last or 0} ({args.out}/checkpoints)", file=sys.stderr)
    trainer.close()
    return 130
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
