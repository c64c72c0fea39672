"""`dsv3 configs [NAME|PATH] [--check]`: list the model presets, show one (or a config.json, as
dsv3 reads it) as config.json-style JSON, or only check that a config.json is valid."""
from __future__ import annotations

import argparse
import json
import os

from dsv3_jax.errors import UserError

__all__ = ["add_arguments", "run", "summary"]


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("config", nargs="?", metavar="NAME|PATH",
                 help="a preset name, or a config.json / checkpoint directory (omit to list the "
                      "presets)")
  p.add_argument("--check", action="store_true",
                 help="only validate: print one line instead of the JSON")


def summary(cfg) -> str:
  """One line: the architecture's main sizes."""
  moe = (f"{cfg.n_routed_experts} routed experts (top {cfg.num_experts_per_tok}) + "
         f"{cfg.n_shared_experts} shared" if cfg.n_routed_experts else "dense")
  return (f"{cfg.num_hidden_layers} layers (+{cfg.num_nextn_predict_layers} MTP), hidden "
          f"{cfg.hidden_size}, {cfg.num_attention_heads} heads, kv_lora_rank {cfg.kv_lora_rank}, "
          f"{moe}, vocab {cfg.vocab_size}, max positions {cfg.max_position_embeddings}"
          + (", FP8 weights" if cfg.quantization_config else ""))


def run(args: argparse.Namespace) -> int:
  from dsv3_jax.config import PRESETS, ModelConfig
  if args.config is None:
    if args.check:
      raise UserError("--check needs a NAME or PATH")
    width = max(map(len, PRESETS))
    for name, cfg in PRESETS.items():
      print(f"{name:<{width}}  {summary(cfg)}")
    return 0
  if args.config in PRESETS:
    cfg, where = PRESETS[args.config], f"preset {args.config}"
  elif os.path.exists(args.config):
    cfg, where = ModelConfig.from_hf_config(args.config), args.config
  else:
    raise UserError(f"{args.config!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor an "
                    f"existing file or directory")
  if args.check:
    print(f"{where}: valid ({summary(cfg)})")
  else:
    print(json.dumps(cfg.to_hf_config(), indent=2))
  return 0
