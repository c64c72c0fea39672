"""`dsv3 demo`: build a tiny real-format checkpoint, load it back, run it, report sizes.

Needs no download: a randomly initialised tiny model is written in the official HF layout
(safetensors + config.json), loaded through the same `from_pretrained` path as a real
checkpoint, and run on a batch of tokens.

Everything goes under one folder: `--out D` writes D/tiny-deepseek-v3 (the checkpoint) and D/train
(the training part); a D holding an earlier demo needs `--overwrite`. Without --out a temporary
folder is used, named at the start and removed at the end (`--keep` keeps it).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

from dsv3_jax.errors import UserError

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--out", default=None,
                 help="folder for everything the demo writes (default: a temporary folder, "
                      "removed at the end)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace the files of an earlier demo in --out")
  p.add_argument("--keep", action="store_true", help="keep the temporary folder (without --out)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--skip-671b", action="store_true", help="skip the 671B parameter count (~20 s)")
  p.add_argument("--train-steps", type=int, default=300,
                 help="steps of the CPU training part (0 skips it; see dsv3_jax.train.demo)")
  p.add_argument("--train-seconds", type=float, default=150.0, help="time budget of the training part")


def _fmt(n: int) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def run(args: argparse.Namespace) -> int:
  root = args.out
  parts = ("tiny-deepseek-v3", "train")
  if root is not None:
    existing = [p for p in parts if os.path.lexists(os.path.join(root, p))]
    if existing and not args.overwrite:
      raise UserError(f"--out {root} already holds a demo ({', '.join(existing)}); pass "
                      f"--overwrite to replace it, or another --out")
    for p in existing:
      shutil.rmtree(os.path.join(root, p))
    os.makedirs(root, exist_ok=True)
  else:
    root = tempfile.mkdtemp(prefix="dsv3-demo-")
    print(f"writing to the temporary folder {root} ({'kept' if args.keep else 'removed'} at the "
          f"end; --out DIR keeps the files)")
  args.on_interrupt = (f"the partial demo stays in {root}" if args.out or args.keep else
                       "the temporary folder is removed")
  try:
    return _run(args, root)
  finally:
    if args.out is None and not args.keep:
      shutil.rmtree(root, ignore_errors=True)
      print(f"removed {root}")


def _run(args: argparse.Namespace, root: str) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  import dsv3_jax

  cfg = dsv3_jax.TINY
  out = os.path.join(root, "tiny-deepseek-v3")
  t0 = time.perf_counter()
  model = dsv3_jax.DeepseekV3(cfg, rngs=nnx.Rngs(args.seed))
  dsv3_jax.save_pretrained(model, out)
  print(f"wrote tiny DeepSeek-V3 checkpoint ({cfg.num_hidden_layers} layers + "
        f"{cfg.num_nextn_predict_layers} MTP, {cfg.n_routed_experts} experts) to {out}")
  loaded = dsv3_jax.from_pretrained(out)
  tokens = jax.random.randint(jax.random.key(args.seed), (2, 16), 0, cfg.vocab_size, jnp.int32)
  result = nnx.jit(lambda m, t: m.forward(t, mtp=True))(loaded, tokens)
  logits = np.asarray(result.logits)
  print(f"logits {logits.shape} float32: mean {logits.mean():+.5f} std {logits.std():.5f} "
        f"min {logits.min():+.4f} max {logits.max():+.4f}")
  print(f"next-token argmax of sequence 0: {logits[0, -1].argmax()}; MTP logits "
        f"{tuple(result.mtp_logits.shape)}")
  same = np.abs(np.asarray(model(tokens)) - logits).max()
  print(f"saved-then-loaded model (jitted) vs the original (eager): max abs diff {same:.2e}")
  loads = np.asarray(result.router_stats["load"]).tolist()  # [MoE layers, E]
  print(f"tokens per expert, per MoE layer: {loads}")
  c = dsv3_jax.count_params(cfg)
  print(f"tiny preset: {_fmt(c.total)} parameters ({_fmt(c.activated)} activated per token), "
        f"MTP {_fmt(c.mtp)}")
  if not args.skip_671b:
    c = dsv3_jax.count_params(dsv3_jax.DEEPSEEK_V3)
    print(f"deepseek-v3 preset (eval_shape, nothing allocated): {_fmt(c.total)} main-model parameters, "
          f"{_fmt(c.activated)} activated per token, MTP layer {_fmt(c.mtp)}")
  if args.train_steps > 0:
    from dsv3_jax.train.demo import train_demo
    train_demo(os.path.join(root, "train"), steps=args.train_steps,
               max_seconds=args.train_seconds, seq=64, seed=args.seed)
  print(f"done in {time.perf_counter() - t0:.1f} s")
  return 0
