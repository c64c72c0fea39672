"""Helpers for the CLI error tests: a tiny HF checkpoint on disk, and running `dsv3` in-process.

`run_cli` calls `dsv3_jax.cli.main` (no subprocess: no second JAX start-up); `assert_user_error`
checks the contract of every command for a user error: exit status 2, exactly one line on stderr
of the form "dsv3 CMD: error: ..." naming the culprit, and no traceback.
"""
from __future__ import annotations

import json
import os

import dsv3_jax
from dsv3_jax.cli import main
from tests.utils import random_model

# TINY cut to 2 layers (1 dense, 1 MoE) + 1 MTP layer: quick to load and compile.
CFG = dsv3_jax.TINY.replace(num_hidden_layers=2)


def tiny_model(seed: int = 0, cfg=CFG):
  """cfg with the tests' random weights (`tests.utils.random_model`: numpy, no eager jax init)."""
  return random_model(cfg, seed)


def write_checkpoint(model, path: str, *, shards: bool = True) -> str:
  """HF layout (safetensors + config.json); several shards + index when `shards`."""
  dsv3_jax.save_pretrained(model, path, max_shard_bytes=(40_000 if shards else 1 << 40))
  return path


def write_word_tokenizer(path, vocab_size: int, *, chat_template: str | None = None) -> None:
  """A word-level tokenizer.json: '<s>'=0, '</s>'=1, 'w{i}'=i; whitespace pre-tokenizer."""
  from tokenizers import Tokenizer as HFTokenizer, models, pre_tokenizers
  vocab = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
  tok = HFTokenizer(models.WordLevel(vocab, unk_token="w2"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(os.path.join(path, "tokenizer.json"))
  conf = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
  if chat_template is not None:
    conf["chat_template"] = chat_template
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump(conf, f)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of `dsv3 ARGV...` run in this process."""
  capsys.readouterr()
  rc = main([str(a) for a in argv])
  out = capsys.readouterr()
  return rc, out.out, out.err


def assert_user_error(result, cmd: str, *needles: str, status: int = 2) -> str:
  """The one-line error contract; returns the message. `needles` must all appear in it."""
  rc, _, err = result
  assert "Traceback" not in err, err
  lines = [l for l in err.splitlines() if l.strip()]
  assert rc == status, (rc, err)
  assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
  prefix = f"dsv3 {cmd}: error: " if status == 2 else f"dsv3 {cmd}: interrupted"
  assert lines[0].startswith(prefix), lines[0]
  for n in needles:
    assert n in lines[0], f"{n!r} not in {lines[0]!r}"
  return lines[0]
