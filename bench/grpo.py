"""GRPO throughput on this machine: rollout tokens/s (the inference engine, plain and MTP
self-speculative, with the acceptance rate) and train tokens/s (the GRPO optimizer step).

Model: --init CKPT (e.g. the R1-Zero demo's RUN/base, whose MTP head was trained with the main
head), else the demo's tiny byte model with random weights (its MTP head then rarely agrees:
the speculative overhead), float32. Workload: --prompts arithmetic questions x --group-size
completions of up to --max-new-tokens at temperature 1 (one batched call per rollout), then one
GRPO step on the padded batch [N, T]. Rollout tokens/s = generated tokens / (prefill + decode)
wall time, compilation and a warm-up call excluded; train tokens/s = N * T / step time (padding
included: the step processes it), after a warm-up step; the median of --iters calls.

python bench/grpo.py [--init RUN/base] [--markdown bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import Table, print_header, update_results  # noqa: E402


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--init", default=None, help="checkpoint with the byte tokenizer (demo base)")
  p.add_argument("--prompts", type=int, default=16)
  p.add_argument("--group-size", type=int, default=8)
  p.add_argument("--max-new-tokens", type=int, default=24)
  p.add_argument("--iters", type=int, default=3)
  p.add_argument("--markdown", default=None, help="write the table as a section of this file")
  args = p.parse_args(argv)

  from dsv3_jax.inference.tokenizer import Tokenizer
  from dsv3_jax.pretrained import from_pretrained
  from dsv3_jax.rl import GRPOConfig, GRPOObjective, PolicyTrainer, RolloutEngine
  from dsv3_jax.rl.demo import demo_config
  from dsv3_jax.rl.loop import numpy_advantages
  from dsv3_jax.rl.tasks import ArithTask, write_byte_tokenizer
  from dsv3_jax.sharding import make_mesh
  from dsv3_jax.train.optim import OptimConfig, training_runtime

  rt = training_runtime(jnp.float32)
  if args.init:
    model, tok_dir, what = from_pretrained(args.init, runtime=rt), args.init, args.init
  else:
    from flax import nnx
    from dsv3_jax.model import DeepseekV3
    import tempfile
    tok_dir = tempfile.mkdtemp()
    write_byte_tokenizer(tok_dir)
    model, what = DeepseekV3(demo_config(), rt, rngs=nnx.Rngs(0)), "demo tiny model, random weights"
  print_header(f"GRPO rollout/train throughput: {what}; {args.prompts} prompts x G="
               f"{args.group_size}, up to {args.max_new_tokens} new tokens, temperature 1, fp32")
  tok = Tokenizer.from_dir(tok_dir)
  mesh = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
  policy = PolicyTrainer(model, OptimConfig(lr=1e-4, warmup_steps=0, total_steps=100), mesh=mesh)
  examples = ArithTask().sample(np.random.default_rng(0), args.prompts)
  cfg = GRPOConfig(group_size=args.group_size)
  table = Table([("case", "rollout", ""), ("roll", "rollout tok/s", ".0f"),
                 ("acc", "MTP acceptance", ".1%"), ("train", "train tok/s", ".0f"),
                 ("len", "tokens/completion", ".1f")])
  for spec in (False, True):
    engine = RolloutEngine(policy, tok, max_new_tokens=args.max_new_tokens, speculative=spec)
    engine.rollout(examples, args.group_size, 1.0, seed=0)  # compiles
    rates, acc, batch = [], [], None
    for i in range(args.iters):
      rb = engine.rollout(examples, args.group_size, 1.0, seed=i + 1)
      rates.append(rb.gen_tokens_per_s)
      acc.append(rb.acceptance_rate)
      batch = rb
    train = None
    if not spec:
      adv = numpy_advantages(np.random.default_rng(0).random(len(batch.examples)),
                             args.group_size, cfg.eps).astype(np.float32)
      b = {"tokens": batch.tokens, "mask": batch.mask, "old_logp": batch.old_logp,
           "ref_logp": batch.old_logp, "adv": adv}
      policy.step(GRPOObjective(cfg), b)  # compiles
      times = []
      for _ in range(args.iters):
        t = time.perf_counter()
        policy.step(GRPOObjective(cfg), b)
        times.append(time.perf_counter() - t)
      train = batch.tokens.size / statistics.median(times)
    table.add({"case": "MTP speculative" if spec else "plain", "roll": statistics.median(rates),
               "acc": float(np.mean(acc)) if spec else None,
               "train": train if train is not None else "(same step)",
               "len": float(batch.lengths.mean())})
  print(table.markdown())
  if args.markdown:
    update_results(args.markdown, f"GRPO throughput ({what}) on {jax.devices()[0].device_kind}",
                   table.markdown())
  return 0


if __name__ == "__main__":
  sys.exit(main())
