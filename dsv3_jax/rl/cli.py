"""`dsv3 grpo [--init CKPT] --task arith [--out RUN --steps --prompts --group-size ...]`.

GRPO with verifiable rewards (DeepSeek-R1): each step samples --group-size completions for each
of --prompts task questions with the inference engine (batched, --temperature, optionally
--speculative MTP drafting), scores them with the reward function (default: exact-answer
correctness + 0.5 x the `<think>...</think>` format; `--reward MODULE:FUNCTION` replaces it),
and takes --inner-steps optimizer steps of the clipped GRPO objective with a k3 KL penalty
(--beta) to the frozen --init weights (`dsv3_jax.rl`). Everything runs on --mesh.

Without --init (the R1-Zero demo) a fresh tiny model is first pre-trained briefly on the
bundled arithmetic task into RUN/base (`dsv3_jax.rl.demo`). Greedy accuracy on --eval-prompts
held-out questions is measured before the first and after the last step (RUN/eval.json).
Writes RUN/metrics.jsonl (one row per step), RUN/grpo_curves.png (mean reward, accuracy, format
rate, response length and KL per step) and checkpoints every --save-every steps; rerunning the
same command resumes from the latest checkpoint (also after kill -9), reproducing the
uninterrupted run's metrics: prompts and sampling seeds are functions of (--seed, step).
"""
from __future__ import annotations

import argparse
import json
import os

from dsv3_jax.errors import UserError

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--init", default=None, metavar="CKPT",
                 help="policy and reference: a checkpoint or run directory with a tokenizer and "
                      "chat template (default with --task arith: pre-train a tiny model first)")
  p.add_argument("--task", default="arith", help="the task (bundled: arith)")
  p.add_argument("--out", default="runs/grpo", help="run directory (an existing run is resumed)")
  p.add_argument("--steps", type=int, default=40, help="GRPO steps (rollout batches)")
  p.add_argument("--prompts", type=int, default=16, help="questions per step")
  p.add_argument("--group-size", type=int, default=8, help="completions per question (G)")
  p.add_argument("--max-new-tokens", type=int, default=24, help="completion budget")
  p.add_argument("--temperature", type=float, default=1.0, help="rollout temperature")
  p.add_argument("--lr", type=float, default=2e-4, help="learning rate (constant)")
  p.add_argument("--beta", type=float, default=0.04, help="KL penalty weight")
  p.add_argument("--clip", type=float, default=0.2, help="ratio clip epsilon")
  p.add_argument("--inner-steps", type=int, default=2, help="optimizer steps per rollout batch")
  p.add_argument("--speculative", action="store_true", help="MTP speculative rollouts")
  p.add_argument("--reward", default=None, metavar="MODULE:FUNCTION",
                 help="reward function (completion: str, example) -> float (default: "
                      "correctness + 0.5 x format)")
  p.add_argument("--eval-prompts", type=int, default=128, help="held-out questions, greedy")
  p.add_argument("--pretrain-steps", type=int, default=300,
                 help="without --init: SFT steps of the fresh tiny model")
  p.add_argument("--save-every", type=int, default=5, help="checkpoint every N steps")
  p.add_argument("--seed", type=int, default=0, help="prompt and sampling seed")
  from dsv3_jax.sharding.entry import add_mesh_arguments
  add_mesh_arguments(p)


def _check(args) -> None:
  for flag, v, ok in (("--steps", args.steps, args.steps >= 1),
                      ("--prompts", args.prompts, args.prompts >= 1),
                      ("--group-size", args.group_size, args.group_size >= 2),
                      ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1),
                      ("--temperature", args.temperature, args.temperature > 0),
                      ("--lr", args.lr, args.lr > 0), ("--beta", args.beta, args.beta >= 0),
                      ("--clip", args.clip, 0 <= args.clip < 1),
                      ("--inner-steps", args.inner_steps, args.inner_steps >= 1),
                      ("--eval-prompts", args.eval_prompts, args.eval_prompts >= 0),
                      ("--pretrain-steps", args.pretrain_steps, args.pretrain_steps >= 1),
                      ("--save-every", args.save_every, args.save_every >= 1)):
    if not ok:
      raise UserError(f"{flag} has an invalid value {v}")


def run(args: argparse.Namespace) -> int:
  import jax.numpy as jnp
  import numpy as np

  from dsv3_jax.pretrained import from_pretrained
  from dsv3_jax.rl.common import append_metrics, check_record, load_tokenizer
  from dsv3_jax.rl.grpo import GRPOConfig
  from dsv3_jax.rl.loop import evaluate, grpo_iteration, write_grpo_plot
  from dsv3_jax.rl.policy import PolicyTrainer
  from dsv3_jax.rl.rewards import combined_reward, load_reward
  from dsv3_jax.rl.rollout import RolloutEngine
  from dsv3_jax.rl.tasks import get_task
  from dsv3_jax.sharding import cli_mesh
  from dsv3_jax.train.cli import _copy_tokenizer, read_metrics, trim_metrics
  from dsv3_jax.train.optim import OptimConfig, training_runtime
  from dsv3_jax.train.trainer import write_run_config

  _check(args)
  task = get_task(args.task)
  reward_fn = load_reward(args.reward) if args.reward else combined_reward
  mesh = cli_mesh(args)
  if args.init is not None and not os.path.isdir(args.init):
    raise UserError(f"--init {args.init!r} is not a directory")
  cfg = GRPOConfig(group_size=args.group_size, clip_low=args.clip, clip_high=args.clip,
                   beta=args.beta, temperature=args.temperature, inner_steps=args.inner_steps)
  record = {k: getattr(args, k) for k in ("task", "steps", "prompts", "group_size",
                                          "max_new_tokens", "temperature", "lr", "beta", "clip",
                                          "inner_steps", "speculative", "reward", "seed")}
  record["init"] = os.path.abspath(args.init) if args.init else None
  if args.init is None:
    record["pretrain_steps"] = args.pretrain_steps
  resuming = check_record(args.out, record, "dsv3 grpo")
  init = args.init
  if init is None:
    from dsv3_jax.rl.demo import pretrain_arith
    init = pretrain_arith(os.path.join(args.out, "base"), steps=args.pretrain_steps,
                          seed=args.seed, mesh=mesh)
  tok = load_tokenizer(init)
  model = from_pretrained(init, runtime=training_runtime(jnp.float32), mesh=mesh)
  write_run_config(args.out, model.config)
  _copy_tokenizer(args.out, init)
  total = args.steps * args.inner_steps
  optim = OptimConfig(lr=args.lr, warmup_steps=0, total_steps=total, schedule="constant",
                      weight_decay=0.0)
  policy = PolicyTrainer(model, optim, mesh=mesh, out_dir=args.out)
  del model
  ref = policy.frozen_copy()  # the --init weights, frozen
  if resuming and policy.restore() is not None:
    print(f"resumed from GRPO step {policy.step_count // args.inner_steps} in {args.out}/checkpoints")
  engine = RolloutEngine(policy, tok, max_new_tokens=args.max_new_tokens,
                         speculative=args.speculative)
  held_out = task.sample(np.random.default_rng([args.seed, 10**6]), args.eval_prompts)
  eval_path = os.path.join(args.out, "eval.json")
  evals = {}
  if os.path.isfile(eval_path):
    with open(eval_path) as f:
      evals = json.load(f)
  if held_out and "before" not in evals:
    evals["before"] = evaluate(engine, held_out)
    with open(eval_path, "w") as f:
      json.dump(evals, f, indent=1)
  if "before" in evals:
    b = evals["before"]
    print(f"before GRPO: greedy accuracy {b['accuracy']:.1%}, format {b['format']:.1%} on "
          f"{b['n']} held-out questions")
  log_path = os.path.join(args.out, "metrics.jsonl")
  start = policy.step_count // args.inner_steps
  trim_metrics(log_path, start)
  with open(log_path, "a") as log:
    for s in range(start, args.steps):
      m = grpo_iteration(policy, engine, ref, task, cfg, step=s, n_prompts=args.prompts,
                         seed=args.seed, reward_fn=reward_fn)
      append_metrics(log, m)
      acc = f"  MTP acceptance {m['mtp_acceptance']:.0%}" if "mtp_acceptance" in m else ""
      print(f"step {m['step']:3d}  reward {m['reward']:.3f}  accuracy {m['accuracy']:.3f}  "
            f"format {m['format']:.3f}  len {m['response_len']:.1f}  KL {m['kl']:.4f}  "
            f"rollout {m['rollout_tok_s']:.0f} tok/s  train {m['train_tok_s']:.0f} tok/s{acc}  "
            f"| {m['sample']}", flush=True)
      if m["step"] % args.save_every == 0 or m["step"] == args.steps:
        policy.save({"grpo_step": m["step"]}, force=True)
  policy.close()
  if held_out:
    evals["after"] = evaluate(engine, held_out)
    with open(eval_path, "w") as f:
      json.dump(evals, f, indent=1)
    a, b = evals["after"], evals.get("before")
    print(f"after GRPO: greedy accuracy {a['accuracy']:.1%}, format {a['format']:.1%}"
          + (f" (before: {b['accuracy']:.1%}, {b['format']:.1%})" if b else ""))
  rows = read_metrics(log_path)
  plot = os.path.join(args.out, "grpo_curves.png")
  if rows and write_grpo_plot(rows, plot):
    print(f"plot: {plot}")
  print(f"metrics: {log_path}; checkpoints: {args.out}/checkpoints")
  return 0
