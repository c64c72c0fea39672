"""`dsv3 sft --init CKPT --data FILE.jsonl [--out RUN --steps --batch --seq --lr --mesh ...]`.

Supervised fine-tuning on chat JSONL ({"messages": [...]} or {"prompt", "completion"} lines, e.g.
a teacher's `dsv3 generate --prompts P --out FILE.jsonl`: distillation), rendered with the
checkpoint's chat template, packed with segment ids, loss on assistant tokens only (see
`dsv3_jax.rl.sft`). The run directory is a checkpoint like a `dsv3 train` run (config.json,
tokenizer files, checkpoints/<step>/params): `dsv3 generate`, `dsv3 grpo --init` and another
`dsv3 sft --init` take it. metrics.jsonl holds one row per step; rerunning the same command
resumes from the latest checkpoint (run.json records the settings, checked on resume).
"""
from __future__ import annotations

import argparse
import os

from dsv3_jax.errors import UserError

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--init", required=True, metavar="CKPT",
                 help="the model to fine-tune: HF / converted checkpoint or a run directory "
                      "(its tokenizer.json and chat template render the data)")
  p.add_argument("--data", required=True, help="chat JSONL (messages, or prompt/completion)")
  p.add_argument("--out", default="runs/sft", help="run directory (an existing run is resumed)")
  p.add_argument("--steps", type=int, default=100, help="optimizer steps")
  p.add_argument("--batch", type=int, default=8, help="packed rows per step")
  p.add_argument("--seq", type=int, default=256, help="packed row length (tokens)")
  p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
  p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default steps/20)")
  p.add_argument("--mtp-lambda", type=float, default=0.1,
                 help="weight of the MTP loss on the same assistant targets (0: main head only)")
  p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
  p.add_argument("--seed", type=int, default=0, help="data-order seed")
  from dsv3_jax.sharding.entry import add_mesh_arguments
  add_mesh_arguments(p)


def run(args: argparse.Namespace) -> int:
  import jax.numpy as jnp

  from dsv3_jax.pretrained import checkpoint_config, from_pretrained
  from dsv3_jax.rl.common import check_record, load_tokenizer, sft_loop
  from dsv3_jax.rl.policy import PolicyTrainer
  from dsv3_jax.rl.sft import SFTData, SFTObjective, pack, read_chat_jsonl, render_chat
  from dsv3_jax.sharding import cli_mesh
  from dsv3_jax.train.cli import _copy_tokenizer
  from dsv3_jax.train.optim import OptimConfig, training_runtime
  from dsv3_jax.train.trainer import write_run_config

  for flag, v, ok in (("--steps", args.steps, args.steps >= 1), ("--batch", args.batch, args.batch >= 1),
                      ("--seq", args.seq, args.seq >= 2), ("--lr", args.lr, args.lr > 0),
                      ("--save-every", args.save_every, args.save_every >= 1),
                      ("--mtp-lambda", args.mtp_lambda, args.mtp_lambda >= 0)):
    if not ok:
      raise UserError(f"{flag} has an invalid value {v}")
  mesh = cli_mesh(args)
  if not os.path.isdir(args.init):
    raise UserError(f"--init {args.init!r} is not a directory")
  if not os.path.isfile(args.data):
    raise UserError(f"--data {args.data}: no such file")
  cfg = checkpoint_config(args.init)
  if args.seq > cfg.max_position_embeddings:
    raise UserError(f"--seq {args.seq} exceeds max_position_embeddings={cfg.max_position_embeddings}")
  tok = load_tokenizer(args.init)
  rendered = [render_chat(tok, c) for c in read_chat_jsonl(args.data)]
  top = max(max(ids) for ids, _ in rendered)
  if top >= cfg.vocab_size:
    raise UserError(f"--data {args.data}: the tokenizer gives id {top} >= vocab_size "
                    f"{cfg.vocab_size} of --init {args.init}")
  packed = pack(rendered, args.seq)
  warmup = args.warmup if args.warmup is not None else max(args.steps // 20, 1)
  optim = OptimConfig(lr=args.lr, warmup_steps=warmup, total_steps=args.steps)
  record = {"init": os.path.abspath(args.init), "data": os.path.abspath(args.data),
            "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
            "warmup": warmup, "mtp_lambda": args.mtp_lambda, "seed": args.seed}
  resuming = check_record(args.out, record, "dsv3 sft")
  print(f"{len(rendered)} conversations, {int(packed.loss_mask.sum())} assistant tokens, packed "
        f"into {packed.tokens.shape[0]} rows of {args.seq}"
        + (f" ({packed.truncated} cut to --seq)" if packed.truncated else ""))
  model = from_pretrained(args.init, runtime=training_runtime(jnp.float32), mesh=mesh)
  write_run_config(args.out, model.config)
  _copy_tokenizer(args.out, args.init)
  policy = PolicyTrainer(model, optim, mesh=mesh, out_dir=args.out)
  del model
  if resuming and policy.restore() is not None:
    print(f"resumed from step {policy.step_count} in {args.out}/checkpoints")
  hist = sft_loop(policy, SFTData(packed, args.batch, args.seed), SFTObjective(args.mtp_lambda),
                  args.steps, log_path=os.path.join(args.out, "metrics.jsonl"),
                  save_every=args.save_every)
  policy.close()
  if hist:
    print(f"steps {hist[0]['step']}..{hist[-1]['step']}: assistant-token CE {hist[0]['ce']:.3f} -> "
          f"{hist[-1]['ce']:.3f}; checkpoint: {args.out}")
  return 0
