"""`dsv3 generate`: stream a continuation of one prompt from a checkpoint directory.

The weights load straight into their shardings on `--mesh` (default: every device on fsdp) and
generation runs there; multi-host runs start with the --coordinator/--num-processes/--process-id
flags (every process runs the same prompt; process 0 prints).
"""
from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_arguments", "run"]

DTYPES = ("bfloat16", "float32")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--checkpoint", required=True,
                 help="HF or converted (Orbax) checkpoint directory, or a `dsv3 train` run "
                      "directory (its latest step) or step directory (RUN/checkpoints/STEP)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="prompt text (needs tokenizer.json)")
  src.add_argument("--prompt-ids", help="comma-separated prompt token ids (no tokenizer needed)")
  p.add_argument("--tokenizer", help="directory with tokenizer.json (default: --checkpoint)")
  p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  p.add_argument("--max-new-tokens", type=int, default=64)
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
  p.add_argument("--top-p", type=float, default=1.0)
  p.add_argument("--top-k", type=int, default=0, help="0 = off")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding")
  p.add_argument("--eos-id", type=int, action="append",
                 help="token id that ends generation (repeatable; default: the tokenizer's/config's)")
  p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="parameter/compute dtype")
  p.add_argument("--fp8", choices=("dequantize", "keep"), default="dequantize",
                 help="FP8 checkpoints: dequantise to --dtype, or keep the e4m3 weights and run "
                      "the FP8 matmul kernels")
  p.add_argument("--kernels", choices=("reference", "auto", "pallas"), default="reference",
                 help="attention/MoE/FP8 kernels: the jnp reference, or the Pallas kernels of this "
                      "platform (auto falls back to the reference where there are none)")
  from dsv3_jax.sharding.entry import add_mesh_arguments
  add_mesh_arguments(p)


def _fail(msg: str) -> int:
  print(f"dsv3 generate: error: {msg}", file=sys.stderr)
  return 2


def run(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp

  from dsv3_jax.inference.generate import Generator
  from dsv3_jax.inference.sampling import SamplingParams
  from dsv3_jax.inference.tokenizer import Tokenizer
  from dsv3_jax.pretrained import from_pretrained
  from dsv3_jax.sharding import cli_mesh

  try:  # before anything touches a device
    mesh = cli_mesh(args)
  except ValueError as e:
    return _fail(str(e))

  if not os.path.isdir(args.checkpoint):
    return _fail(f"--checkpoint {args.checkpoint!r} is not a directory")
  try:
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  except ValueError as e:
    return _fail(str(e))
  if args.max_new_tokens < 1:
    return _fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  from dsv3_jax.param_tree import CheckpointNotFound, locate
  try:  # a training run or step keeps config.json and the tokenizer in the run directory
    located = locate(args.checkpoint)
  except CheckpointNotFound as e:
    return _fail(str(e))
  tok_dir = args.tokenizer or (located.config_dir if located is not None else args.checkpoint)
  tokenizer = None
  if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
    tokenizer = Tokenizer.from_dir(tok_dir)
  if args.prompt is not None:
    if tokenizer is None:
      return _fail(f"no tokenizer.json in {tok_dir}: pass --tokenizer DIR or --prompt-ids")
    ids = tokenizer.encode_chat(args.prompt) if args.chat else tokenizer.encode(args.prompt)
  else:
    try:
      ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    except ValueError:
      return _fail(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}")
  if not ids:
    return _fail("the prompt is empty")
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  print(f"loading {args.checkpoint} ...", file=sys.stderr)
  from dsv3_jax.config import RuntimeConfig
  rt = RuntimeConfig(param_dtype=dtype, dtype=dtype, attention_backend=args.kernels,
                     moe_backend=args.kernels)
  model = from_pretrained(args.checkpoint, dtype, runtime=rt, fp8=args.fp8, mesh=mesh)
  vocab = model.config.vocab_size
  if max(ids) >= vocab or min(ids) < 0:
    return _fail(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
  eos = args.eos_id
  if eos is None and tokenizer is not None and tokenizer.eos_token_id is not None:
    eos = tokenizer.eos_token_id
  generated: list[int] = []
  printed = [""]
  main = jax.process_index() == 0  # every process generates; process 0 prints
  stdout = sys.stdout if main else open(os.devnull, "w")

  def on_step(new: list[list[int]]) -> None:
    generated.extend(new[0])
    if tokenizer is None:
      stdout.write("".join(f"{t} " for t in new[0]))
    else:
      text = tokenizer.decode(generated)
      if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
        return
      stdout.write(text[len(printed[0]):])
      printed[0] = text
    stdout.flush()

  try:
    res = Generator(model, mesh=mesh).run([ids], max_new_tokens=args.max_new_tokens,
                                          sampling=sampling, seed=args.seed, eos_token_id=eos,
                                          speculative=args.speculative, on_step=on_step)
  except ValueError as e:
    return _fail(str(e))
  if tokenizer is not None:  # anything held back waiting for more bytes
    stdout.write(tokenizer.decode(generated)[len(printed[0]):])
  stdout.write("\n")
  n = res.num_generated
  msg = (f"{n} tokens in {res.prefill_seconds + res.decode_seconds:.2f} s: "
         f"{res.tokens_per_second:.1f} tokens/s (prefill {res.prefill_seconds:.3f} s, decode "
         f"{res.decode_seconds:.2f} s; compile {res.compile_seconds:.1f} s not counted)")
  if res.acceptance_rate is not None:
    msg += f"; MTP acceptance {res.acceptance_rate:.1%}"
  if main:
    print(msg, file=sys.stderr)
  return 0
