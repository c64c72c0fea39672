"""`dsv3 eval --checkpoint DIR --data FILE [--seq T --batch B --max-windows N]`: perplexity.

The token file (any `dsv3 train` token file: .npy, .u32, .u16/.bin) is cut into consecutive
non-overlapping windows of `--seq` tokens (the tail shorter than a window is not used); in each
window the model predicts tokens 1..T-1 from their prefix (positions restart at 0 per window, no
document mask: the same view as training without --document-mask). Reported: the mean negative
log-likelihood over all predicted tokens (nats/token) and its exp, the perplexity.
"""
from __future__ import annotations

import argparse
import math
import os
import time

from dsv3_jax.errors import UserError

__all__ = ["add_arguments", "run", "window_nll"]


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True, help="HF or converted (Orbax) checkpoint directory")
  p.add_argument("--data", required=True, help="token file (.npy, .u32, .u16/.bin)")
  p.add_argument("--seq", type=int, default=512, help="window length in tokens")
  p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
  p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first N windows")
  p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                 help="parameter/compute dtype (the loss is computed in float32)")
  from dsv3_jax.sharding.entry import add_mesh_arguments
  add_mesh_arguments(p)


def window_nll(model, tokens):
  """Summed next-token NLL per window: tokens int32 [B, T] -> float32 [B] (T-1 predictions each).
  The log-softmax runs in float32."""
  import jax
  import jax.numpy as jnp
  logits = model.forward(tokens).logits[:, :-1].astype(jnp.float32)  # [B, T-1, V]
  logp = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return -picked.sum(axis=1)


def run(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from dsv3_jax import ui
  from dsv3_jax.config import ModelConfig
  from dsv3_jax.pretrained import from_pretrained
  from dsv3_jax.sharding import cli_mesh
  from dsv3_jax.train.data import _open, check_token_files

  mesh = cli_mesh(args)
  if args.seq < 2 or args.batch < 1:
    raise UserError(f"need --seq >= 2 and --batch >= 1, got {args.seq}, {args.batch}")
  if args.max_windows is not None and args.max_windows < 1:
    raise UserError(f"--max-windows must be >= 1, got {args.max_windows}")
  if not os.path.isdir(args.checkpoint):
    raise UserError(f"--checkpoint {args.checkpoint!r} is not a directory")
  if os.path.isfile(os.path.join(args.checkpoint, "config.json")):  # checked before loading
    cfg = ModelConfig.from_hf_config(args.checkpoint)
    if args.seq > cfg.max_position_embeddings:
      raise UserError(f"--seq {args.seq} exceeds max_position_embeddings="
                      f"{cfg.max_position_embeddings} of {args.checkpoint}/config.json")
    check_token_files([args.data], cfg.vocab_size)
  tokens = _open(args.data, None)
  n_windows = len(tokens) // args.seq
  if args.max_windows is not None:
    n_windows = min(n_windows, args.max_windows)
  if n_windows == 0:
    raise UserError(f"{args.data}: {len(tokens)} tokens, fewer than one window of --seq {args.seq}")
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  ui.status(f"loading {args.checkpoint} ...")
  t0 = time.perf_counter()
  model = from_pretrained(args.checkpoint, dtype, mesh=mesh, progress=jax.process_index() == 0)
  if args.seq > model.config.max_position_embeddings:
    raise UserError(f"--seq {args.seq} exceeds max_position_embeddings="
                    f"{model.config.max_position_embeddings}")
  ui.status(f"loaded in {time.perf_counter() - t0:.1f} s; compiling the forward pass ...")
  fn = nnx.jit(window_nll)
  total, count = 0.0, 0
  bar = ui.progress(n_windows, "eval", unit="window")
  for start in range(0, n_windows, args.batch):
    rows = min(args.batch, n_windows - start)
    batch = np.zeros((args.batch, args.seq), np.int32)  # a fixed shape: one compilation
    batch[:rows] = np.asarray(tokens[start * args.seq:(start + rows) * args.seq]).reshape(rows, args.seq)
    if batch.max() >= model.config.vocab_size:
      raise UserError(f"{args.data}: token id {int(batch.max())} >= vocab_size "
                      f"{model.config.vocab_size}")
    with jax.set_mesh(mesh):
      nll = np.asarray(fn(model, jnp.asarray(batch)), np.float64)
    total += float(nll[:rows].sum())
    count += rows * (args.seq - 1)
    bar.update(rows)
  bar.close()
  mean = total / count
  print(f"{args.data}: {count} predicted tokens in {n_windows} windows of {args.seq}: mean NLL "
        f"{mean:.6f} nats/token, perplexity {math.exp(mean):.4f}")
  return 0
