"""`dsv3 generate`: stream a continuation of a prompt (or complete a batch of prompts) from a
checkpoint directory.

The weights load straight into their shardings on `--mesh` (default: every device on fsdp) and
generation runs there; multi-host runs start with the --coordinator/--num-processes/--process-id
flags (every process runs the same prompts; process 0 prints).

One prompt streams its continuation to stdout. Several prompts (`--prompt`/`--prompt-ids`
repeated, or `--prompt-file`) run as one batch and print one JSON line per prompt, in order:
{"prompt": ..., "completion": ..., "ids": [...]} ("completion" only with a tokenizer).
Everything that can be checked before loading the weights is (flags, config.json, prompt length
against max_position_embeddings, token ids against the vocabulary, `--kernels pallas` on a
platform without Pallas kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from dsv3_jax.errors import UserError

__all__ = ["add_arguments", "add_model_arguments", "run", "read_prompt_file", "prepare", "load",
           "load_model"]

DTYPES = ("bfloat16", "float32")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
  """The flags `dsv3 generate` and `dsv3 serve` share: the checkpoint, tokenizer, EOS ids,
  speculative decoding, dtype, FP8 handling, kernels and the mesh."""
  p.add_argument("--checkpoint", required=True,
                 help="HF or converted (Orbax) checkpoint directory, or a `dsv3 train` run "
                      "directory (its latest step) or step directory (RUN/checkpoints/STEP)")
  p.add_argument("--tokenizer", help="directory with tokenizer.json (default: --checkpoint)")
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


def add_arguments(p: argparse.ArgumentParser) -> None:
  add_model_arguments(p)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", action="append",
                   help="prompt text (needs tokenizer.json); repeat for a batch")
  src.add_argument("--prompt-ids", action="append",
                   help="comma-separated prompt token ids (no tokenizer needed); repeat for a batch")
  src.add_argument("--prompt-file", "--prompts",
                   help="one prompt per line (blank lines skipped); a .jsonl file holds one JSON "
                        "string or {\"prompt\": ...} per line; '-' reads stdin")
  p.add_argument("--out", default=None, metavar="FILE.jsonl",
                 help="write the JSON lines (prompt, completion, ids) to this file instead of "
                      "stdout, never streaming (a distillation set for `dsv3 sft --data`)")
  p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
  p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
  p.add_argument("--top-k", type=int, default=0, help="0 = off")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")


def read_prompt_file(path: str) -> list[str]:
  """The prompts of a --prompt-file (see the flag's help); UserError naming the file and line."""
  if path == "-":
    lines = sys.stdin.read().splitlines()
  else:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  prompts = []
  for i, line in enumerate(lines, 1):
    if not line.strip():
      continue
    if path.endswith(".jsonl"):
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f"--prompt-file {path}: line {i}: malformed JSON ({e.msg})") from None
      item = item.get("prompt") if isinstance(item, dict) else item
      if not isinstance(item, str):
        raise UserError(f"--prompt-file {path}: line {i}: expected a string or "
                        f"{{\"prompt\": string}}")
      line = item
    prompts.append(line)
  if not prompts:
    raise UserError(f"--prompt-file {path}: no prompts (the file is empty)")
  return prompts


def _parse_ids(spec: str) -> list[int]:
  try:
    return [int(t) for t in spec.split(",") if t.strip()]
  except ValueError:
    raise UserError(f"--prompt-ids must be comma-separated integers, got {spec!r}") from None


def _check_kernels(kernels: str) -> None:
  import jax
  platform = jax.default_backend()
  if kernels == "pallas" and platform not in ("tpu", "gpu", "cuda", "rocm"):
    raise UserError(f"--kernels pallas: there are no Pallas kernels for platform {platform!r}; "
                    f"use --kernels reference (or auto, which falls back to it)")


def _early_config(checkpoint: str):
  """The checkpoint's ModelConfig read before any weight (None if it has no config.json: the
  loader then reports what is missing)."""
  from dsv3_jax.config import ModelConfig
  if os.path.isfile(os.path.join(checkpoint, "config.json")):
    return ModelConfig.from_hf_config(checkpoint)
  return None


def prepare(args: argparse.Namespace):
  """What `dsv3 generate` and `dsv3 serve` check before loading weights: multi-host start-up
  and the --mesh (before anything touches a device), --kernels on this platform, the checkpoint
  directory, its config.json (None when it has none) and tokenizer (None without
  tokenizer.json). Returns (mesh, cfg, tokenizer)."""
  from dsv3_jax.inference.tokenizer import Tokenizer
  from dsv3_jax.param_tree import locate
  from dsv3_jax.sharding import cli_mesh
  mesh = cli_mesh(args)  # before anything touches a device
  _check_kernels(args.kernels)
  if not os.path.isdir(args.checkpoint):
    raise UserError(f"--checkpoint {args.checkpoint!r} is not a directory")
  # A training run or step keeps config.json and the tokenizer in the run directory
  # (CheckpointNotFound, a UserError, for a run without a finished step).
  located = locate(args.checkpoint)
  config_dir = located.config_dir if located is not None else args.checkpoint
  cfg = _early_config(config_dir)
  tok_dir = args.tokenizer or config_dir
  tokenizer = None
  if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
    tokenizer = Tokenizer.from_dir(tok_dir)
  elif args.tokenizer:
    raise UserError(f"--tokenizer {args.tokenizer}: no tokenizer.json there")
  return mesh, cfg, tokenizer


def load(args: argparse.Namespace, mesh, cfg):
  """The model of --checkpoint in --dtype with the --kernels backends, loaded into its
  shardings on `mesh` (after `prepare`)."""
  import jax
  import jax.numpy as jnp

  from dsv3_jax import ui
  from dsv3_jax.config import RuntimeConfig
  from dsv3_jax.pretrained import from_pretrained
  if args.speculative and cfg is not None and cfg.num_nextn_predict_layers < 1:
    raise UserError(f"--speculative needs an MTP layer: {args.checkpoint}/config.json has "
                    f"num_nextn_predict_layers=0")
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  rt = RuntimeConfig(param_dtype=dtype, dtype=dtype, attention_backend=args.kernels,
                     moe_backend=args.kernels, linear_backend=args.kernels)
  main = jax.process_index() == 0
  say = ui.status if main else (lambda msg: None)
  say(f"loading {args.checkpoint} ...")
  t0 = time.perf_counter()
  model = from_pretrained(args.checkpoint, dtype, runtime=rt, fp8=args.fp8, mesh=mesh,
                          progress=main)
  say(f"loaded in {time.perf_counter() - t0:.1f} s")
  return model


def load_model(args: argparse.Namespace):
  """`prepare` then `load`: (model, tokenizer or None, mesh)."""
  mesh, cfg, tokenizer = prepare(args)
  return load(args, mesh, cfg), tokenizer, mesh


def run(args: argparse.Namespace) -> int:
  import jax

  from dsv3_jax import ui
  from dsv3_jax.inference.generate import Generator
  from dsv3_jax.inference.sampling import SamplingParams

  try:
    sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
  except ValueError as e:
    raise UserError(f"--temperature/--top-k/--top-p: {e}") from None
  if args.max_new_tokens < 1:
    raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
    raise UserError(f"--out {args.out}: its directory does not exist")
  mesh, cfg, tokenizer = prepare(args)
  texts = read_prompt_file(args.prompt_file) if args.prompt_file else args.prompt
  if texts is not None:
    if tokenizer is None:
      raise UserError(f"no tokenizer.json in {args.tokenizer or args.checkpoint}: pass "
                      f"--tokenizer DIR or --prompt-ids")
    prompts = [tokenizer.encode_chat(t) if args.chat else tokenizer.encode(t) for t in texts]
  else:
    prompts = [_parse_ids(s) for s in args.prompt_ids]
  for i, ids in enumerate(prompts):
    which = f"prompt {i + 1}" if len(prompts) > 1 else "the prompt"
    if not ids:
      raise UserError(f"{which} is empty")
    if cfg is not None:
      if max(ids) >= cfg.vocab_size or min(ids) < 0:
        raise UserError(f"{which}: token ids must be in [0, {cfg.vocab_size}) (vocab_size of "
                        f"{args.checkpoint}/config.json), got {min(ids)}..{max(ids)}")
      if len(ids) + args.max_new_tokens > cfg.max_position_embeddings:
        raise UserError(f"{which} has {len(ids)} tokens; with --max-new-tokens "
                        f"{args.max_new_tokens} that exceeds max_position_embeddings="
                        f"{cfg.max_position_embeddings} of {args.checkpoint}/config.json")
  model = load(args, mesh, cfg)
  main = jax.process_index() == 0  # every process generates; process 0 prints
  say = ui.status if main else (lambda msg: None)
  say("compiling prefill and decode (once per prompt-length bucket) ...")
  vocab = model.config.vocab_size
  for ids in prompts:  # a checkpoint without config.json checked here, after loading
    if max(ids) >= vocab or min(ids) < 0:
      raise UserError(f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}")
  eos = args.eos_id
  if eos is None and tokenizer is not None and tokenizer.eos_token_id is not None:
    eos = tokenizer.eos_token_id
  stdout = sys.stdout if main else open(os.devnull, "w")
  stream = len(prompts) == 1 and args.out is None
  generated: list[int] = []
  printed = [""]

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

  res = Generator(model, mesh=mesh).run(prompts, max_new_tokens=args.max_new_tokens,
                                        sampling=sampling, seed=args.seed, eos_token_id=eos,
                                        speculative=args.speculative,
                                        on_step=on_step if stream else None)
  if stream:
    if tokenizer is not None:  # anything held back waiting for more bytes
      stdout.write(tokenizer.decode(generated)[len(printed[0]):])
    stdout.write("\n")
  else:
    dest = open(args.out, "w", encoding="utf-8") if args.out and main else stdout
    for i, toks in enumerate(res.tokens):
      row = {"prompt": texts[i] if texts is not None else prompts[i]}
      if tokenizer is not None:
        row["completion"] = tokenizer.decode(toks)
      row["ids"] = toks
      dest.write(json.dumps(row) + "\n")
    if dest is not stdout:
      dest.close()
      say(f"wrote {len(res.tokens)} prompt/completion lines to {args.out}")
  n = res.num_generated
  msg = (f"{n} tokens in {res.prefill_seconds + res.decode_seconds:.2f} s: "
         f"{res.tokens_per_second:.1f} tokens/s (prefill {res.prefill_seconds:.3f} s, decode "
         f"{res.decode_seconds:.2f} s; compile {res.compile_seconds:.1f} s not counted)")
  if res.acceptance_rate is not None:
    msg += f"; MTP acceptance {res.acceptance_rate:.1%}"
  say(msg)
  return 0
