"""`dsv3 tokenize INPUT... --tokenizer DIR --out FILE`: text -> a token file for `dsv3 train`.

Inputs: `.jsonl` files hold one document per line, its text in `--field` (default "text");
any other file is UTF-8 text whose documents are separated by a blank line (`--whole-files`: one
document per file). Each document is encoded with DIR/tokenizer.json (`tokenizers`; the BOS
token first when tokenizer_config.json says add_bos_token) and followed by the end-of-document
id (`--eos-id`, default the tokenizer's EOS token). The output type follows its suffix: `.u32`
(raw uint32, the default choice) or `.npy` (uint32), or `.u16` when the vocabulary fits uint16
(see `dsv3_jax.train.data`). Nothing is written when an input is missing, empty or malformed.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Iterator

from dsv3_jax.errors import UserError

__all__ = ["add_arguments", "run", "read_documents"]


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("inputs", nargs="+", metavar="INPUT", help="text or .jsonl files")
  p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
  p.add_argument("--out", required=True, help="token file to write: .u32, .npy or .u16")
  p.add_argument("--field", default="text", help="the text field of .jsonl lines")
  p.add_argument("--whole-files", action="store_true",
                 help="each text file is one document (default: blank lines separate documents)")
  p.add_argument("--eos-id", type=int, default=None,
                 help="end-of-document id (default: the tokenizer's EOS token)")
  p.add_argument("--batch", type=int, default=1000, help="documents encoded per call")
  p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def read_documents(path: str, field: str = "text", whole_files: bool = False) -> Iterator[str]:
  """The documents of one input file (see the module docstring); UserError naming file and line."""
  if not os.path.isfile(path):
    raise UserError(f"input {path} does not exist" if not os.path.exists(path) else
                    f"input {path} is not a file")
  with open(path, encoding="utf-8") as f:
    try:
      if path.endswith(".jsonl"):
        for i, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {i}: malformed JSON ({e.msg})") from None
          text = row.get(field) if isinstance(row, dict) else None
          if not isinstance(text, str):
            raise UserError(f"{path}: line {i}: no string field {field!r} (--field)")
          yield text
      else:
        text = f.read()
        docs = [text] if whole_files else text.split("\n\n")
        yield from (d.strip("\n") for d in docs if d.strip())
    except UnicodeDecodeError as e:
      raise UserError(f"{path}: not UTF-8 text (byte {e.start}); is it already a token file?") from None


def run(args: argparse.Namespace) -> int:
  import numpy as np

  from dsv3_jax import ui
  from dsv3_jax.inference.tokenizer import Tokenizer
  from dsv3_jax.train.data import token_dtype, write_tokens

  dtype = token_dtype(args.out) or np.dtype(np.uint32)  # refuses a suffix that is not a token file
  if args.out.endswith(".bin"):
    raise UserError(f"--out {args.out}: name the type: .u32 (uint32), .npy or .u16")
  if os.path.exists(args.out) and not args.overwrite:
    raise UserError(f"--out {args.out} already exists (pass --overwrite to replace it)")
  if args.batch < 1:
    raise UserError(f"--batch must be >= 1, got {args.batch}")
  tok = Tokenizer.from_dir(args.tokenizer)
  eos = args.eos_id if args.eos_id is not None else tok.eos_token_id
  if eos is None:
    raise UserError(f"{args.tokenizer}: the tokenizer has no EOS token; pass --eos-id")
  vocab = tok.vocab_size
  if not 0 <= eos < max(vocab, eos + 1) or eos > np.iinfo(dtype).max:
    raise UserError(f"--eos-id {eos} does not fit {dtype.name}")
  if vocab - 1 > np.iinfo(dtype).max:
    raise UserError(f"--out {args.out}: {dtype.name} cannot hold the {vocab} ids of the tokenizer; "
                    f"use .u32 or .npy")
  for path in args.inputs:  # every input checked before the work starts
    if not os.path.isfile(path):
      raise UserError(f"input {path} does not exist")
  parts, n_docs = [], 0
  bar = ui.progress(None, "tokenize", unit="doc")

  def flush(batch):
    enc = tok.tok.encode_batch(batch, add_special_tokens=False)
    bos = [tok.bos_token_id] if tok.add_bos_token else []
    for e in enc:
      parts.append(np.asarray(bos + e.ids + [eos], np.int64))
    bar.update(len(batch))

  for path in args.inputs:
    batch, before = [], n_docs
    for doc in read_documents(path, args.field, args.whole_files):
      batch.append(doc)
      n_docs += 1
      if len(batch) == args.batch:
        flush(batch)
        batch = []
    if batch:
      flush(batch)
    if n_docs == before:
      raise UserError(f"input {path} holds no documents (empty?)")
  bar.close()
  tokens = np.concatenate(parts)
  write_tokens(args.out, tokens, dtype=None if args.out.endswith(".npy") else dtype)
  print(f"wrote {len(tokens)} tokens ({n_docs} documents, eos id {eos}) to {args.out} "
        f"({dtype.name}); train on it with: dsv3 train --data {args.out} --eos-id {eos}")
  return 0
